"""Training: SFT preparation of teacher and student (sft), the OPD step (opd_step) and loop (loop),
the checkpoint cache (checkpoints), typed configs (config) and held-out evaluation (evaluate)."""

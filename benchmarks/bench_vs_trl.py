"""One OPD step of our trainer vs TRL's `DistillationTrainer`, on the same weights, measured side by side.

Both sides train the same random-weight Qwen2 student (2 layers x 128) against the same frozen teacher
(4 layers x 256), vocabulary 512, saved once as Hugging Face checkpoints: TRL loads them with
`from_pretrained`, we with `opd.model.hf.load_pretrained` (`model@student=hf`). Per step: 16 prompts, one
rollout each, up to 128 new tokens at temperature 1 and top-p 0.9, then an AdamW update of the student on
the reverse KL to the teacher. TRL: fully on-policy, `beta=1` (reverse KL over the full vocabulary),
float32, no gradient checkpointing. Ours: `loss=full_rkl` (the same objective) and `loss=lsm` (K = 32).
Prompts: TRL gets 32-token prompts of a word-level tokenizer over the 512 ids; ours come from the
arithmetic task (at most 34 tokens, left-padded to its maximum). Random weights give flat rows: almost no
row stops early, so both sides generate ~128 tokens per row (the mean response length is printed).

Each side runs in its own process (one at a time, all cores), alternating TRL / full_rkl / lsm for
`--rounds` rounds. Per run: the median step time over steps 3..N, its split (generate / teacher / update),
the first step (compilation; JAX compiles the sampler, scoring and update there) and the sum of all N
step times. The last line is the median over rounds of TRL's step time over ours:

    TRL/opd full_rkl=<ratio> lsm=<ratio>

TRL is the optional `peer` extra, installed only for this benchmark (CPU build of torch):

    pip install -e '.[peer]'
    python benchmarks/bench_vs_trl.py [--rounds 3] [--steps 12] [--compile-cache DIR]

`--compile-cache DIR` runs our side with `opd.compile_cache.enable(DIR)`: from the second run on, the first
step no longer compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, BATCH, PROMPT, NEW, TOP_P, LR, K = 512, 16, 32, 128, 0.9, 5e-5, 32
STUDENT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 512}
TEACHER = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 1024}
EOS, PAD = 1, 0
TIME_KEYS = ("generate", "teacher", "update")


def _has_trl() -> bool:
    try:
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


# --- the shared checkpoints -----------------------------------------------------------------------------


def build_checkpoints(root: Path) -> tuple[Path, Path]:
    """Random-weight Qwen2 student and teacher (HF's default initialization), saved as safetensors."""
    import torch
    import transformers

    dirs = []
    for seed, (name, shape) in enumerate((("student", STUDENT), ("teacher", TEACHER))):
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, max_position_embeddings=PROMPT + NEW + 64,
                                       rope_theta=1e6, tie_word_embeddings=False, bos_token_id=None,
                                       eos_token_id=EOS, pad_token_id=PAD, torch_dtype="float32", **shape)
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg)
        path = root / name
        model.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


# --- TRL side (its own process) ---------------------------------------------------------------------------


def word_tokenizer():
    """A word-level tokenizer over the 512 ids ("t2" -> 2, ...) for TRL, which tokenizes text prompts."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                padding_side="left")


def run_trl(student_dir: str, teacher_dir: str, steps: int) -> dict:
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    rng = np.random.default_rng(0)
    prompts = [" ".join(f"t{i}" for i in rng.integers(2, VOCAB, PROMPT)) for _ in range(BATCH * steps)]
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
        max_completion_length=NEW, temperature=1.0, top_p=TOP_P, top_k=0, beta=1.0, disable_dropout=True,
        shuffle_dataset=False, dataloader_num_workers=0, seed=0,
    )
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tok = word_tokenizer()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}))

    spent = {"generate": 0.0, "teacher": 0.0}
    lengths: list[float] = []
    generate = student.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        spent["generate"] += time.perf_counter() - t0
        completion = out[:, kw["input_ids"].shape[1]:]
        is_eos = completion == EOS
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.shape[1])
        lengths.append(float(ends.float().mean()))
        return out

    student.generate = timed_generate
    teacher_start: list[float] = []
    teacher.model.register_forward_pre_hook(lambda *_: teacher_start.append(time.perf_counter()))

    def teacher_done(*_):
        spent["teacher"] += time.perf_counter() - teacher_start.pop()

    teacher.model.register_forward_hook(teacher_done)

    rows: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()
            spent.update(generate=0.0, teacher=0.0)

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t0
            rows.append({"step": total, "generate": spent["generate"], "teacher": spent["teacher"],
                         "update": total - spent["generate"] - spent["teacher"]})

    trainer.add_callback(StepTimer())
    trainer.train()
    return {"rows": rows, "response_len": float(np.mean(lengths)) if lengths else float("nan"),
            "threads": torch.get_num_threads()}


# --- our side (its own process) ----------------------------------------------------------------------------


def train_ours(loss: str, student_dir: str, teacher_dir: str, steps: int) -> list[dict]:
    """Our trainer through its public entry (Hydra config -> validate -> opd.train.loop.run_opd) on the HF
    checkpoints; one dict per step with the step's generate / teacher / update seconds. This is the only
    place that knows the trainer's API."""
    from hydra import compose, initialize_config_dir

    from opd.model import hf
    from opd.train.config import register_configs, validate
    from opd.train.loop import Route, run_opd

    register_configs()
    overrides = [
        "model@student=hf", f"student.path={student_dir}", "model@tasks.arithmetic.teacher=hf",
        f"tasks.arithmetic.teacher.path={teacher_dir}",
        f"loss={loss}", f"rollout.prompts_per_step={BATCH}", "rollout.group_size=1",
"rollout.temperature=1.0", f"rollout.top_p={TOP_P}",
        f"optimizer.lr={LR}", f"steps={steps}", f"eval_every={10**6}", "log_every=1000000",
    ]
    if loss == "lsm":
        overrides.append(f"loss.k={K}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=overrides)
    built = validate(cfg)
    student, teacher = hf.load_pretrained(student_dir), hf.load_pretrained(teacher_dir)
    (name, r), = built["routes"].items()
    r["task"].max_response_len = NEW  # the response budget is the task's; the benchmark fixes it
    route = Route(name=name, task=r["task"], teacher=teacher, mapping=r["mapping"],
                  train_items=r["task"].items("train", 512, 7), eval_items=r["task"].items("eval", 1, 0))
    out = run_opd(cfg, student, [route], log=lambda s: None, chunk_size=built.get("chunk_size"))
    return [{"generate": r["time/sample_s"], "teacher": r["time/score_s"], "update": r["time/update_s"],
             "response_len": r["response_len"]} for r in out["rows"]]


def run_ours(loss: str, student_dir: str, teacher_dir: str, steps: int, compile_cache: str) -> dict:
    import jax
    import numpy as np

    if compile_cache:
        from opd import compile_cache as cc

        cc.enable(compile_cache)
    rows = train_ours(loss, student_dir, teacher_dir, steps)
    for r in rows:
        r["step"] = sum(r[k] for k in TIME_KEYS)
    return {"rows": rows, "response_len": float(np.mean([r["response_len"] for r in rows])),
            "threads": os.cpu_count(), "backend": jax.default_backend()}


# --- the driver ------------------------------------------------------------------------------------------


def child(side: str, args) -> None:
    t0 = time.perf_counter()
    if side == "trl":
        out = run_trl(args.student, args.teacher, args.steps)
    else:
        out = run_ours(side, args.student, args.teacher, args.steps, args.compile_cache)
    out["process_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out))


def summarize(name: str, out: dict) -> dict:
    rows = out["rows"]
    later = rows[2:] if len(rows) > 2 else rows
    med = {k: statistics.median(r[k] for r in later) for k in ("step", *TIME_KEYS)}
    return {"name": name, **med, "first": rows[0]["step"], "total": sum(r["step"] for r in rows),
            "process": out["process_s"], "len": out["response_len"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile-cache", default="", help="directory for our side's persistent compilation cache")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--student", default="", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    if not _has_trl():
        print("bench_vs_trl: skipped, TRL is not installed (pip install -e '.[peer]')")
        return
    if args.steps < 3:
        ap.error("--steps: expected an integer >= 3 (steps 1-2 are warm-up)")

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        student_dir, teacher_dir = build_checkpoints(Path(tmp))
        print(f"shapes: student Qwen2 {STUDENT}, teacher {TEACHER}, vocab {VOCAB}; {BATCH} prompts x ~{PROMPT} "
              f"tokens, {NEW} new tokens at top-p {TOP_P}, AdamW lr {LR}; {args.steps} steps, medians of steps "
              f"3-{args.steps}; {args.rounds} alternating rounds, {os.cpu_count()} CPU cores")
        results: dict[str, list[dict]] = {"trl": [], "full_rkl": [], "lsm": []}
        for r in range(1, args.rounds + 1):
            for side in results:
                cmd = [sys.executable, __file__, "--child", side, "--student", str(student_dir),
                       "--teacher", str(teacher_dir), "--steps", str(args.steps)]
                if args.compile_cache:
                    cmd += ["--compile-cache", args.compile_cache]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                    raise SystemExit(f"bench_vs_trl: the {side} run failed (exit {proc.returncode})")
                s = summarize(side, json.loads(lines[-1][len("RESULT "):]))
                results[side].append(s)
                name = "TRL" if side == "trl" else f"opd {side}"
                print(f"round {r} {name:>12}: step {s['step']:.3f}s = generate {s['generate']:.3f} + teacher "
                      f"{s['teacher']:.3f} + update {s['update']:.3f}; first step {s['first']:.2f}s; "
                      f"{args.steps} steps {s['total']:.2f}s; process {s['process']:.1f}s; "
                      f"mean response {s['len']:.0f} tokens", flush=True)

    med = {side: {k: statistics.median(s[k] for s in runs) for k in ("step", "first", "total", *TIME_KEYS)}
           for side, runs in results.items()}
    print("medians over rounds (s):")
    for side, m in med.items():
        print(f"  {side:>8}: step {m['step']:.3f} (generate {m['generate']:.3f}, teacher {m['teacher']:.3f}, "
              f"update {m['update']:.3f}); first step {m['first']:.2f}; whole {args.steps}-step run {m['total']:.2f}")
    trl = med["trl"]["step"]
    print(f"TRL/opd full_rkl={trl / med['full_rkl']['step']:.2f} lsm={trl / med['lsm']['step']:.2f}")


if __name__ == "__main__":
    main()

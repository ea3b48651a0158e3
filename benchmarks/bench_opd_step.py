"""CPU time per OPD step on a config (default: conf/opd.yaml's default) and its split into generation,
teacher scoring and update; and the teacher's top-K probability mass on its own rollouts for several K
(how the default K was chosen: the paper's K = 32 over a 152K vocabulary holds ~97-99% of the teacher's
mass, peers.md; we pick the smallest K that holds about as much on this vocabulary).

    python benchmarks/bench_opd_step.py [--steps 10] [--skip-mass | --mass-only] [hydra overrides ...]

Teacher and student come from the SFT checkpoint cache (trained on first use, as `experiments.opd` does).
The first step (compilation) is reported separately and excluded from the means.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir

from opd.train.config import register_configs, to_container, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def topk_mass_table(teacher, task, ks, *, n_prompts: int = 64, seed: int = 0, policy=None,
                    top_p: float = 1.0) -> dict[int, float]:
    """Mean teacher top-K mass over response tokens of rollouts from `policy` (default: the teacher
    itself) at T = 1 and the given top-p."""
    from opd import sampling
    from opd.diagnostics import teacher_topk_mass
    from opd.teacher import score
    from opd.train.evaluate import encode_prompts

    probs = task.problems("train", n_prompts, seed + 99)
    prompt, mask = encode_prompts(task, [p.prompt for p in probs])
    cfg = sampling.SamplingConfig(temperature=1.0, top_p=top_p, top_k=0, max_new_tokens=task.max_response_len)
    policy = policy if policy is not None else teacher
    roll = sampling.sample(policy, prompt, mask, jax.random.key(seed), cfg, eos_id=task.tokenizer.eos_id)
    out = {}
    for k in ks:
        payload = score(teacher, roll.tokens_BxL, roll.attention_mask_BxL, k)
        out[k] = float(teacher_topk_mass(payload.topk_logprobs_BxLxK, roll.response_mask_BxL))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-mass", action="store_true")
    ap.add_argument("--mass-only", action="store_true", help="only the top-K mass table")
    args, overrides = ap.parse_known_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=[*overrides, f"steps={args.steps}", f"eval_every={10**6}"])
    built = validate(cfg)
    task = built["task"]

    from opd.train.loop import TaskSpec, run_opd
    from opd.train.sft import prepare

    resolved = to_container(cfg)
    teacher, _ = prepare("teacher", built["teacher"], built["teacher"].to_dict(), task, resolved["task"],
                         cfg.sft_teacher, resolved["sft_teacher"], root=cfg.checkpoint_root, log=print)
    student, _ = prepare("student", built["student"], built["student"].to_dict(), task, resolved["task"],
                         cfg.sft_student, resolved["sft_student"], root=cfg.checkpoint_root, log=print)

    if not args.skip_mass:
        table = topk_mass_table(teacher, task, [1, 2, 4, 8, 16, 32])
        masses = "  ".join(f"K={k}: {m:.4f}" for k, m in table.items())
        print(f"teacher top-K mass on teacher rollouts (vocab {built['teacher'].vocab_size}): {masses}")
        table = topk_mass_table(teacher, task, [1, 2, 4, 8, 16, 32], policy=student, top_p=0.9)
        masses = "  ".join(f"K={k}: {m:.4f}" for k, m in table.items())
        print(f"teacher top-K mass on SFT-student rollouts (top-p 0.9): {masses}")
    if args.mass_only:
        return

    max_new = int(cfg.rollout.max_new_tokens or task.max_response_len)
    spec = TaskSpec(task=task, teacher=teacher, train_problems=task.problems("train", 512, 7),
                    eval_problems=task.problems("eval", 8, 0), max_new_tokens=max_new)
    t0 = time.perf_counter()
    out = run_opd(cfg, student, spec, log=lambda s: None)
    total = time.perf_counter() - t0
    rows = out["rows"]
    keys = ("time/sample_s", "time/score_s", "time/update_s")
    first = sum(rows[0][k] for k in keys)
    mean = {k: float(np.mean([r[k] for r in rows[1:]])) for k in keys}
    step = sum(mean.values())
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    print(f"config: loss={cfg.loss.name} batch={batch} (prompts {cfg.rollout.prompts_per_step} x G "
          f"{cfg.rollout.group_size}) max_new_tokens={max_new} K={cfg.loss.k} devices={jax.devices()}")
    print(f"first step (compile) {first:.2f}s; {len(rows) - 1} further steps, {total:.1f}s in all (with eval)")
    share = {k: 100 * v / step for k, v in mean.items()}
    print(f"per OPD step: {step:.3f}s = generation {mean['time/sample_s']:.3f}s ({share['time/sample_s']:.0f}%)"
          f" + teacher scoring {mean['time/score_s']:.3f}s ({share['time/score_s']:.0f}%)"
          f" + update {mean['time/update_s']:.3f}s ({share['time/update_s']:.0f}%)")
    print(f"mean response length {np.mean([r['response_len'] for r in rows]):.1f} tokens")


if __name__ == "__main__":
    main()

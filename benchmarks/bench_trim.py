"""Teacher scoring and the update on a batch at the task's full budget width and cut to its longest rollout
(`rollout.pad_multiple`), side by side in one process.

A task pads every rollout to its whole budget (prompt 15 + budget 626 = 641 positions in the regime) while
the regime's responses end near 200 tokens (Table 2's rows: a step's mean length is about 195-215). Here one
step's rollouts are sampled by a random student of the config's architecture (it writes to the full
budget), each row is then ended at a length drawn uniformly from [--response-len - 20, --response-len + 20],
and the same rollouts go through the loop's own stages (trim_padding, score_stage, build_batch,
OPDStepper.update) untrimmed and trimmed, alternating rounds. A cost depends on shapes, not weights, so random
models time what trained ones would. The first update of each variant starts from the same weights; the
difference of their losses is printed (float order only).

    python benchmarks/bench_trim.py                                  # experiment=table1, loss=lsm
    python benchmarks/bench_trim.py --response-len 400 --rounds 5 experiment=table1 loss=sampled_token
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_objective_cost import compose_cfg
from flax import nnx
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from opd.cli import composition_error
from opd.train.config import ConfigError, register_configs, validate


def end_rows(rollouts, prompt_len: int, lengths: np.ndarray):
    """`rollouts` with row b's response ended after lengths[b] tokens (padding after it)."""
    cols = np.arange(np.shape(rollouts.tokens)[1])[None, :]
    keep = cols < prompt_len + lengths[:, None]
    return dataclasses.replace(
        rollouts, tokens=np.where(keep, rollouts.tokens, 0), attention_mask=rollouts.attention_mask * keep,
        response_mask=rollouts.response_mask * keep, logprobs=rollouts.logprobs * keep,
        response_len=np.minimum(rollouts.response_len, lengths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per variant (after one compile)")
    ap.add_argument("--response-len", type=int, default=205, help="mean response length of the cut rows")
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args(argv)
    overrides = overrides or ["experiment=table1", "loss=lsm"]
    if args.rounds < 1 or args.response_len < 21:
        print(f"error: --rounds and --response-len: expected >= 1 and >= 21, got {args.rounds} and "
              f"{args.response_len}", file=sys.stderr)
        return 2
    register_configs()
    try:
        try:
            cfg = compose_cfg(overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise composition_error(err) from None
        built = validate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(built["routes"]) != 1:
        print("error: overrides: expected a single-route configuration (one task)", file=sys.stderr)
        return 2
    multiple = int(cfg.rollout.pad_multiple)
    if multiple == 0:
        print("error: rollout.pad_multiple: expected a positive integer here (0 leaves nothing to compare)",
              file=sys.stderr)
        return 2

    from opd import objectives
    from opd.model.transformer import Transformer
    from opd.train.batch import build_batch, trim_padding
    from opd.train.loop import Route, sample_stage, score_stage
    from opd.train.opd_step import OPDStepper

    (name, r), = built["routes"].items()
    task = r["task"]
    if args.response_len + 20 > task.max_response_len:
        print(f"error: --response-len: expected <= {task.max_response_len - 20} (the budget less the spread), "
              f"got {args.response_len}", file=sys.stderr)
        return 2
    teacher = Transformer(r["teacher"], rngs=nnx.Rngs(args.seed + 1))
    route = Route(name=name, task=task, teacher=teacher)
    n = int(cfg.rollout.prompts_per_step) * int(cfg.rollout.group_size)
    items = task.items("train", n, args.seed)
    sampler = Transformer(built["student"], rngs=nnx.Rngs(args.seed))
    rollouts = sample_stage(sampler, route, items, jax.random.key(args.seed), cfg)
    lengths = np.random.default_rng(args.seed).integers(args.response_len - 20, args.response_len + 21, n)
    rollouts = end_rows(rollouts, int(task.max_prompt_len), lengths)
    special = list(task.special_ids().values())
    k, variants = int(cfg.loss.k), {"full width": 0, f"cut (x{multiple})": multiple}
    # an objective that reads the teacher's logits in the update gets its graph and weights there, as in the loop
    t_graphdef, t_state = nnx.split(teacher) if objectives.get(cfg.loss.name).teacher == "logits" else (None, None)

    def step(stepper, pad_multiple):
        t0 = time.perf_counter()
        cut = trim_padding(rollouts, pad_multiple)
        payload = jax.block_until_ready(score_stage(route, cut, k))
        t1 = time.perf_counter()
        batch = build_batch(cut, payload, special_ids=special, mask_special_tokens=bool(cfg.loss.mask_special_tokens))
        metrics = jax.block_until_ready(stepper.update(batch, t_state, teacher_graphdef=t_graphdef))
        return float(metrics["loss"]), batch.tokens_BxL.shape[1], t1 - t0, time.perf_counter() - t1

    steppers, first = {}, {}
    for label, m in variants.items():  # the same starting weights; the first (compiling) step is not timed
        steppers[label] = OPDStepper(Transformer(built["student"], rngs=nnx.Rngs(args.seed + 2)), cfg.loss,
                                     cfg.optimizer, teacher_graphdef=t_graphdef)
        first[label] = step(steppers[label], m)
    times = {label: [] for label in variants}
    for _ in range(args.rounds):  # alternating: background load falls on both alike
        for label, m in variants.items():
            times[label].append(step(steppers[label], m)[2:])
    fa, fb = first.values()
    print(f"{' '.join(overrides)}: {n} rollouts, prompt {task.max_prompt_len} + budget {task.max_response_len}, "
          f"responses {args.response_len - 20}-{args.response_len + 20}; {args.rounds} rounds, median seconds")
    base = None
    for label in variants:
        score_s, update_s = (float(np.median([t[i] for t in times[label]])) for i in (0, 1))
        base = base or score_s + update_s
        print(f"{label:<14} width {first[label][1]:4d}: score {score_s:6.3f}  update {update_s:6.3f}  "
              f"x{base / (score_s + update_s):.2f}")
    print(f"first-step loss {fa[0]:.7f} vs {fb[0]:.7f} (difference {abs(fa[0] - fb[0]):.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

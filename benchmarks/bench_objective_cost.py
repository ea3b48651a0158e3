"""Seconds and peak memory of one training update per objective, measured side by side in one process.

The baselines table (issue 13) puts each objective's cost beside its score. Its sweep's own `s / step` column
comes from jobs that ran under different loads (other jobs on the same cores), so it cannot rank objectives by
cost. Here every objective updates the same student architecture on the same batch at the table's shapes
(regime: 16 prompts x 4 rollouts, the full response budget), in round-robin order so that any background load
falls on all of them alike, and each is reported as a ratio to sampled-token OPD's update.

Sampling and teacher top-K scoring are the same stages for every objective (only the rollout top-p differs),
so the update is where their costs part. Peak memory is XLA's buffer assignment of the compiled update
(opd.train.opd_step.update_peak_bytes), per device. The models are randomly initialized: an update's cost
depends on shapes, not weights, and a random student writes to the full budget (the longest batch a step sees).

    python benchmarks/bench_objective_cost.py                       # the baselines table's objectives
    python benchmarks/bench_objective_cost.py --objectives lsm,full_rkl --rounds 5 experiment=table1
    python benchmarks/bench_objective_cost.py --out results/benchmarks/objective_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from opd import objectives
from opd.cli import composition_error
from opd.train.config import ConfigError, register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
BASELINES = "sampled_token,vopd,vopd_topk,constant_negative,full_rkl,topk_tail,stop_grad_topk,lsm"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="opd", overrides=overrides)


def make_batch(cfg, built, seed: int):
    """One step's batch at the config's shapes: the route's rollouts from a random student, scored by a
    random teacher of the route's architecture, through the loop's own stages and batch builder."""
    from opd.model.transformer import Transformer
    from opd.train.batch import build_batch
    from opd.train.loop import Route, sample_stage, score_stage

    (name, r), = built["routes"].items()
    teacher = Transformer(r["teacher"], rngs=nnx.Rngs(seed + 1))
    student = Transformer(built["student"], rngs=nnx.Rngs(seed))
    route = Route(name=name, task=r["task"], teacher=teacher)
    n_prompts, group = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    items = [it for it in r["task"].items("train", n_prompts, seed) for _ in range(group)]
    rollouts = sample_stage(student, route, items, jax.random.key(seed), cfg)
    payload = score_stage(route, rollouts, int(cfg.loss.k))
    batch = build_batch(rollouts, payload, special_ids=list(route.task.special_ids().values()),
                        mask_special_tokens=bool(cfg.loss.mask_special_tokens))
    return batch, teacher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", default=BASELINES, help=f"comma list of registered objectives "
                    f"(default: {BASELINES}); ratios are to the first")
    ap.add_argument("--rounds", type=int, default=10, help="timed updates per objective (after one compile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here (refused if it exists)")
    args, overrides = ap.parse_known_args(argv)
    overrides = overrides or ["experiment=table1"]
    names = [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in objectives.NAMES]
    if not names or unknown:
        print(f"error: --objectives: expected a comma list of {', '.join(objectives.NAMES)}, got "
              f"{args.objectives!r}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"error: --rounds: expected a positive integer, got {args.rounds}", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists():
        print(f"error: --out: {args.out} exists; nothing was measured or overwritten", file=sys.stderr)
        return 2
    register_configs()
    try:
        try:
            cfgs = {n: compose_cfg([*overrides, f"loss={n}"]) for n in names}
        except (HydraException, OmegaConfBaseException) as err:
            raise composition_error(err) from None
        built = {n: validate(c) for n, c in cfgs.items()}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if any(len(b["routes"]) != 1 for b in built.values()):
        print("error: overrides: expected a single-route configuration (one task)", file=sys.stderr)
        return 2

    from opd.model.transformer import Transformer
    from opd.train.opd_step import OPDStepper

    first = names[0]
    batch, teacher = make_batch(cfgs[first], built[first], args.seed)
    t_graphdef, t_state = nnx.split(teacher)
    steppers, peak = {}, {}
    for n in names:  # build and compile each update once (the compile is not timed)
        student = Transformer(built[n]["student"], rngs=nnx.Rngs(args.seed))
        steppers[n] = OPDStepper(student, cfgs[n].loss, cfgs[n].optimizer, teacher_graphdef=t_graphdef)
        metrics = jax.block_until_ready(steppers[n].update(batch, t_state))
        peak[n] = metrics.get("update_peak_bytes")
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # round-robin: background load falls on every objective alike
        for n in names:
            t0 = time.perf_counter()
            jax.block_until_ready(steppers[n].update(batch, t_state))
            times[n].append(time.perf_counter() - t0)

    base_s, base_mem = float(np.median(times[first])), peak[first]
    rows = []
    print(f"update cost at {' '.join(overrides)}: batch {tuple(batch.tokens_BxL.shape)}, K={cfgs[first].loss.k}, "
          f"{args.rounds} rounds, median seconds; ratios to {first}")
    print(f"{'objective':<20} {'update_s':>9} {'x':>6} {'peak MiB':>9} {'x':>6}")
    for n in names:
        s = float(np.median(times[n]))
        mem = peak[n]
        rows.append({"objective": n, "update_s": s, "update_s_ratio": s / base_s,
                     "peak_mem_bytes": mem, "peak_mem_ratio": None if mem is None or not base_mem else mem / base_mem})
        mem_s = "–" if mem is None else f"{mem / 2**20:.1f}"
        mem_r = "–" if rows[-1]["peak_mem_ratio"] is None else f"{rows[-1]['peak_mem_ratio']:.2f}"
        print(f"{n:<20} {s:>9.3f} {s / base_s:>6.2f} {mem_s:>9} {mem_r:>6}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python benchmarks/bench_objective_cost.py " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
            "overrides": overrides, "batch_shape": list(batch.tokens_BxL.shape), "rounds": args.rounds,
            "devices": [str(d) for d in jax.devices()], "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

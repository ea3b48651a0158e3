"""Held-out evaluation throughput against its batch size and the sampler's decode windows, on a committed student.

The protocol's final evaluation (1000 test items x (4 samples + greedy)) is most of a table job's time in
the regime (results/notes/31_regime_tables.md), and its batch size (`eval_batch_size`) was never measured:
a batch decodes until its longest response, so a larger one is not necessarily faster.
This times `opd.train.evaluate.outcomes` (the function every evaluation runs) on
the same items at each batch size, side by side in one process, after one compiling call per size, and prints
items per second and the ratio to the first size. Accuracy is printed too: a different batch size draws
different samples (fold_in per batch start), so it agrees within sampling noise, not exactly.

`--windows` times each batch size at each `SamplingConfig.first_window` (0 = the cache at full length from
the first step, the sampler before decode windows): same batches, same keys, so the per-item outcomes
should agree except where a float-order difference flips a draw; the share that agrees is printed.

    python benchmarks/bench_eval_batch.py                       # experiment=table1, 256 items, sizes 32 16 8 64
    python benchmarks/bench_eval_batch.py --items 512 --sizes 32 128 --overrides experiment=regime
    python benchmarks/bench_eval_batch.py --sizes 32 --windows 0 128 --overrides experiment=regime
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 16, 8, 64])
    ap.add_argument("--greedy", action="store_true", help="greedy decodes (default: top-p 0.9 samples)")
    ap.add_argument("--windows", type=int, nargs="+", default=[64],
                    help="SamplingConfig.first_window values (0 = one window)")
    ap.add_argument("--overrides", nargs="*", default=["experiment=table1"])
    args = ap.parse_args()
    bad = [s for s in args.sizes if s < 1]
    if args.items < 1 or bad:
        ap.error(f"--items and --sizes: expected integers >= 1, got items={args.items} sizes={args.sizes}")
    if any(w < 0 for w in args.windows):
        ap.error(f"--windows: expected integers >= 0, got {args.windows}")

    import jax
    from hydra import compose, initialize_config_dir

    from opd import sampling
    from opd.train import evaluate as ev
    from opd.train.checkpoints import is_complete, load_model, read_meta
    from opd.train.config import register_configs, to_container, validate
    from opd.train.sft import new_model
    from opd.train.store import unpack

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=list(args.overrides))
    built = validate(cfg)
    name, route = next(iter(built["routes"].items()))
    task = route["task"]
    root = ROOT / cfg.checkpoint_root
    stored = sorted((ROOT / cfg.checkpoint_store).glob("*.tar.gz"))
    # the stored student of this configuration: label "student[/route]", the student's architecture and task section
    task_section = to_container(cfg)["tasks"][name]["task"]
    model = None
    for archive in stored:
        key = archive.name[: -len(".tar.gz")]
        if not is_complete(root / key):
            unpack(key, ROOT / cfg.checkpoint_store, root)
        meta = read_meta(root / key)
        if (str(meta.get("label", "")).split("/")[0] == "student" and meta.get("model") == built["student"].to_dict()
                and meta.get("tasks", {}).get(name) == task_section
                and set(meta.get("tasks", {})) == set(built["routes"])):  # not a multi-task student of this task
            model = load_model(new_model(built["student"], 0), root / key)
            print(f"student checkpoint {key}")
            break
    if model is None:
        sys.exit(f"error: checkpoint_store: no student of this configuration in {cfg.checkpoint_store}")

    items = task.items(str(cfg.eval_split), args.items, int(cfg.eval_seed))
    key = jax.random.key(0)
    print(f"{name}: {args.items} items, {'greedy' if args.greedy else 'top-p 0.9'}, "
          f"budget {task.max_response_len} tokens, {jax.device_count()} device(s)")

    base = None
    for size in args.sizes:
        first_scores = None
        for window in args.windows:
            run = dict(greedy=args.greedy, batch_size=size, sample_fn=sampling.with_first_window(window))
            t0 = time.perf_counter()
            ev.outcomes(model, task, items[:size], key, **run)  # compile
            first_call = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = ev.outcomes(model, task, items, key, **run)
            rate = args.items / (time.perf_counter() - t0)
            base = base or rate
            first_scores = scores if first_scores is None else first_scores
            print(f"batch {size:4d} first_window {window:4d}: {rate:7.2f} items/s  x{rate / base:.2f}  "
                  f"accuracy {scores.mean():.3f}  same outcome as window {args.windows[0]}: "
                  f"{(scores == first_scores).mean():.3f}  first call {first_call:.1f}s", flush=True)


if __name__ == "__main__":
    main()

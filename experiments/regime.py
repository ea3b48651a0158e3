"""The regime report (issue 12): does a configuration hold the paper's shape and failure modes? R1-R7, measured.

    python -m experiments.regime                         # the regime (conf/experiment/regime.yaml)
    python -m experiments.regime experiment=single_task  # any other OPD configuration, any overrides

Composes conf/opd.yaml like experiments.opd (with `experiment=regime` unless an experiment is given),
validates it, prepares or reuses the cached SFT models of its first route -- the teacher (on the task's
`teacher_view()` when it has one: the teacher's style and conventions), the student, and the capacity check
(the student's architecture on the teacher's demonstrations with the teacher's SFT recipe) -- and measures,
with the trainer's own stages (`sample_stage` at the objective's rollout top-p, `score_stage`,
`build_batch` unmasked) and `opd.failure_modes`; R4-R7 on STEP1_BATCHES step-1 batches together; the capacity
check, prepared last (it trains longest) after the other measurements are logged, takes the teacher's SFT
recipe, with `capacity_sft_steps` steps when set (0: skipped, capacity_accuracy null):

    R1 gap            teacher_accuracy >= 0.85 and 0.15 <= student_accuracy <= 0.50 (sampled pass@1, top-p 0.9)
    R2 learnability   capacity_accuracy >= 0.80
    R3 multimodal     0.5 <= teacher_top1_mass <= 0.9 (teacher's mean top-1 probability on its own rollouts,
                      sampled at T = 1, top-p 1)
    R4 long horizon   teacher_median_response_len >= 256, response budget >= 2x it, and gap_iqr_ratio >= 2
                      (IQR of log q - log pi on step-1 student tokens in the last quarter of positions over the
                      first; quarters of the student rollouts' median length)
    R5 failure mode 1 neg_reward_frac_step1 >= 0.5
    R6 failure mode 2 endorsed_loop_frac >= 0.01: step-1 student rollouts holding a repetition loop (a block of
                      up to fm.LOOP_MAX_PERIOD tokens, a whole line, repeated >= 3 times back to back, >=
                      LOOP_MIN_TOKENS tokens) on whose tokens the teacher's mean probability is >= 0.5
    R7 failure mode 3 one shared vocabulary, the teacher's special-token conventions differ, and the teacher's
                      log-prob of the student's EOS at its first occurrence (unmasked) is <= -20 nats
                      (eos_logprob_mapped; null when the student's EOS is the teacher's)

The last line printed is one JSON object: those keys plus "passes" (the names of R1-R7 that hold). It exits
0 whether or not they hold; a bad configuration is one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import hydra
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from opd import failure_modes as fm
from opd.cli import entry_point, progress, run_main
from opd.train.config import register_configs, to_container, validate

register_configs()

KEYS = ("teacher_accuracy", "student_accuracy", "capacity_accuracy", "teacher_top1_mass",
        "teacher_median_response_len", "gap_iqr_ratio", "neg_reward_frac_step1", "endorsed_loop_frac",
        "eos_logprob_mapped")
LOOP_MIN_TOKENS = 8  # shorter "loops" are digit runs such as "000", not repetition
ENDORSED_PROB = 0.5
EOS_NATS = -20.0
# Step-1 batches measured together: at 16 prompts x 4 samples, 256 rollouts, so R6's 1% is 2.6 rollouts
# rather than a fraction of one.
STEP1_BATCHES = 4


# ---------------------------------------------------------------------------------------------------------
# Measurements on arrays (pure; tested on constructed inputs)
# ---------------------------------------------------------------------------------------------------------


def top1_mass(topk_logprobs_BxLxK, mask_BxL) -> float:
    """Mean over response tokens of the teacher's top-1 probability."""
    m = np.asarray(mask_BxL) > 0
    top1 = np.exp(np.asarray(topk_logprobs_BxLxK, np.float64).max(axis=-1))
    return float(top1[m].mean()) if m.any() else float("nan")


def gap_iqr_ratio(teacher_sampled_BxL, student_sampled_BxL, mask_BxL, response_len_B) -> float | None:
    """IQR of the sampled-token gap in the last quarter of positions / IQR in the first quarter.

    Quarters of the rollouts' median response length (positions [0, m/4) and [3m/4, m)), through
    `fm.gap_quantiles_by_bucket` with bucket_size ceil(m/4). None when a quarter is empty; inf when the
    first quarter's IQR is 0 and the last's is not."""
    median = float(np.median(np.asarray(response_len_B)))
    if median < 4:
        return None
    size = math.ceil(median / 4)
    out = fm.gap_quantiles_by_bucket(teacher_sampled_BxL, student_sampled_BxL, mask_BxL, bucket_size=size,
                                     quantiles=(0.25, 0.75))
    if len(out["count"]) < 4 or not out["count"][0] or not out["count"][3]:
        return None
    first, last = (out["quantiles"][j][1] - out["quantiles"][j][0] for j in (0, 3))
    if first == 0:
        return math.inf if last > 0 else None
    return float(last / first)


def endorsed_loop_frac(tokens_BxL, mask_BxL, student_sampled_BxL, teacher_sampled_BxL, *,
                       min_tokens: int = LOOP_MIN_TOKENS, min_teacher_prob: float = ENDORSED_PROB) -> float:
    """Fraction of rows holding a repetition loop of >= `min_tokens` tokens whose teacher probability, averaged
    over the loop's tokens, is >= `min_teacher_prob` (the paper's Fig 3: the teacher keeps rewarding it)."""
    rows = np.shape(tokens_BxL)[0]
    out = fm.loop_probabilities(tokens_BxL, mask_BxL, student_sampled_BxL, teacher_sampled_BxL,
                                max_loops=10**9)
    hit = {lp["row"] for lp in out["loops"]
           if lp["length"] >= min_tokens and float(np.mean(lp["teacher_prob"])) >= min_teacher_prob}
    return len(hit) / rows if rows else 0.0


def passes(r: dict[str, Any], *, budget: int, shared_vocabulary: bool, conventions_differ: bool) -> list[str]:
    """The names of R1-R7 that hold for the measurements `r` (None never passes)."""

    def at_least(key: str, bound: float) -> bool:
        return r.get(key) is not None and r[key] >= bound

    def within(key: str, lo: float, hi: float) -> bool:
        return r.get(key) is not None and lo <= r[key] <= hi

    med = r.get("teacher_median_response_len")
    held = {
        "R1": at_least("teacher_accuracy", 0.85) and within("student_accuracy", 0.15, 0.50),
        "R2": at_least("capacity_accuracy", 0.80),
        "R3": within("teacher_top1_mass", 0.5, 0.9),
        "R4": med is not None and med >= 256 and budget >= 2 * med and at_least("gap_iqr_ratio", 2.0),
        "R5": at_least("neg_reward_frac_step1", 0.5),
        "R6": at_least("endorsed_loop_frac", 0.01),
        "R7": shared_vocabulary and conventions_differ and r.get("eos_logprob_mapped") is not None
        and r["eos_logprob_mapped"] <= EOS_NATS,
    }
    return [name for name, ok in held.items() if ok]


def report_line(r: dict[str, Any], passed: list[str]) -> str:
    """The report's last line: exactly KEYS (numbers or null) plus "passes"."""

    def clean(v):
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)

    return json.dumps({**{k: clean(r.get(k)) for k in KEYS}, "passes": list(passed)})


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def pad_columns(arrays: list[np.ndarray]) -> np.ndarray:
    """[B_i, L_i] arrays stacked into one [sum B_i, max L_i], right-padded with zeros."""
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])


def step1(cfg: Any, student, route, *, batches: int = STEP1_BATCHES,
          log: Callable[[str], None] = progress) -> dict[str, Any]:
    """Step 1 of the configured OPD run, measured: the trainer's sample, score and (unmasked) batch stages on
    `batches` batches of training prompts drawn as the loop's first step draws them (the first is the loop's
    own), then R4-R7's statistics of all their rollouts together."""
    from opd.train.batch import build_batch
    from opd.train.loop import rollout_top_p, run_sampler, sample_stage, score_stage

    n, group = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    pick = np.random.default_rng(int(cfg.seed))
    key = jax.random.split(jax.random.key(int(cfg.seed)))[1]  # the loop's first rollout key
    parts: dict[str, list[np.ndarray]] = {"q": [], "p": [], "mask": [], "tokens": []}
    lengths, scores = [], []
    for b in range(batches):
        items = [route.train_items[i] for i in pick.integers(0, len(route.train_items), n) for _ in range(group)]
        rollouts = sample_stage(student, route, items, key if b == 0 else jax.random.fold_in(key, b), cfg,
                                run_sampler(cfg))
        payload = score_stage(route, rollouts, int(cfg.loss.k), vocab_size=student.cfg.vocab_size)
        batch = build_batch(rollouts, payload, special_ids=list(route.task.special_ids().values()),
                            mask_special_tokens=False)
        parts["q"].append(np.asarray(batch.teacher_sampled_BxL))
        parts["p"].append(np.asarray(batch.old_logprobs_BxL))
        parts["mask"].append(np.asarray(batch.response_mask_BxL))
        parts["tokens"].append(np.asarray(rollouts.tokens))
        lengths.append(np.asarray(rollouts.response_len))
        scores.append(np.asarray(rollouts.score))
    q, p, mask, tokens = (pad_columns(parts[k]) for k in ("q", "p", "mask", "tokens"))
    response_len = np.concatenate(lengths)
    special = fm.special_token_logprobs(tokens, mask, p, q, route.task.special_ids())
    log(f"[regime] step 1: {len(response_len)} student rollouts ({batches} batches) at top-p "
        f"{rollout_top_p(cfg)}, median length {np.median(response_len):.0f}, train score "
        f"{np.mean(np.concatenate(scores)):.3f}")
    return {
        "neg_reward_frac_step1": fm.neg_reward_frac(q, p, mask),
        "gap_iqr_ratio": gap_iqr_ratio(q, p, mask, response_len),
        "endorsed_loop_frac": endorsed_loop_frac(tokens, mask, p, q),
        "eos_teacher_logprob": special.get("eos", {}).get("teacher_mean"),
        "special_tokens": {k: {"student_mean": v["student_mean"], "teacher_mean": v["teacher_mean"]}
                           for k, v in special.items()},
    }


def teacher_rollout_stats(cfg: Any, teacher, teacher_task, items: list) -> dict[str, Any]:
    """The teacher on its own rollouts (T = 1, top-p 1): mean top-1 probability and median response length."""
    from opd.teacher import score
    from opd.train.loop import run_sampler

    rollouts = teacher_task.rollout(teacher, items, jax.random.key(int(cfg.eval_seed) + 1), temperature=1.0,
                                    top_p=1.0, sample_fn=run_sampler(cfg))
    payload = score(teacher, rollouts.tokens, rollouts.attention_mask, int(cfg.loss.k))
    return {"teacher_top1_mass": top1_mass(payload.topk_logprobs_BxLxK, rollouts.response_mask),
            "teacher_median_response_len": float(np.median(rollouts.response_len)),
            "teacher_truncated_frac": float(np.mean(rollouts.truncated))}


def measure(cfg: Any, built: dict[str, Any], *, log: Callable[[str], None] = progress) -> dict[str, Any]:
    """Every R1-R7 number of the configuration's first route, plus what `passes` needs."""
    from opd.tasks.common import teacher_cache_section
    from opd.train import evaluate as ev
    from opd.train.loop import Route, run_sampler
    from opd.train.sft import prepare_base, prepare_then

    t0 = time.time()
    resolved = to_container(cfg)
    name, r = next(iter(built["routes"].items()))
    rc = cfg.tasks[name]
    task = r["task"]
    teacher_task = r["teacher_task"]  # the teacher's style and conventions (validate applies teacher_view)
    n_eval = int(cfg.eval_problems)
    eval_key = jax.random.key(int(cfg.eval_seed))

    batch = min(int(cfg.eval_batch_size), n_eval)

    def spec_of(view) -> dict[str, Any]:
        """What a held-out accuracy depends on; the batch size too, since each batch draws its own key."""
        return {"items": n_eval, "eval_seed": int(cfg.eval_seed), "samples": int(cfg.eval_samples),
                "batch_size": batch, "task": repr(view)}

    def evaluate(model, view):
        return ev.evaluate(model, view, view.items("eval", n_eval, int(cfg.eval_seed)), eval_key,
                           samples=int(cfg.eval_samples), batch_size=batch, prefix="", sample_fn=run_sampler(cfg))

    def held_out(label: str, model, meta: dict, view) -> float:
        """Sampled pass@1 (top-p 0.9) on the first n_eval eval items; reused from the checkpoint's meta when
        measured the same way."""
        if meta.get("sft_eval_spec") == spec_of(view) and meta.get("sft_eval"):
            return float(meta["sft_eval"]["accuracy"])
        metrics, _ = evaluate(model, view)
        log(f"[regime] {label}: held-out {view.metric} {metrics[view.metric]:.3f} (greedy "
            f"{metrics['greedy_' + view.metric]:.3f})")
        return float(metrics[view.metric])

    def eval_fn_for(view):
        def eval_fn(model):
            metrics, items = evaluate(model, view)
            return {"accuracy": metrics[view.metric], "greedy": metrics["greedy_" + view.metric]}, {name: items}
        return eval_fn, spec_of(view)

    task_section = resolved["tasks"][name]["task"]
    # Sections as experiments.opd keys them, so the teacher and student caches are shared with OPD runs.
    teacher_section = teacher_cache_section(task, task_section)  # the student's style does not retrain these
    t_sections = {"model": r["teacher"].to_dict(), "task": teacher_section,
                  "tokenizer": [cfg.tokenizer, rc.teacher_tokenizer], "sft": resolved["tasks"][name]["sft"]}
    s_sections = {"model": built["student"].to_dict(), "tokenizer": cfg.tokenizer, "tasks": {name: task_section},
                  "sft": resolved["sft_student"]}
    capacity_sft = rc.sft if cfg.capacity_sft_steps is None else OmegaConf.merge(
        rc.sft, {"steps": int(cfg.capacity_sft_steps)})
    c_sections = {**s_sections, "tasks": {name: teacher_section}, "sft": to_container(capacity_sft),
                  "role": "capacity"}
    root = cfg.checkpoint_root
    models, acc = {}, {}

    def prepared(label, model_cfg, view, sections, sft_cfg, init_from=None, then=None):
        eval_fn, spec = eval_fn_for(view)
        models[label], meta = prepare_then(f"{label}/{name}", model_cfg, [view], sections, sft_cfg, then, root=root,
                                           store=cfg.checkpoint_store, eval_fn=eval_fn, eval_spec=spec, log=log,
                                           init_from=init_from)
        acc[label] = held_out(label, models[label], meta, view)

    base = None if r["base_task"] is None else prepare_base(
        f"teacher/{name}", r["teacher"], r["base_task"], t_sections, rc.sft, rc.teacher_base_steps, root=root,
        store=cfg.checkpoint_store, log=log)
    prepared("teacher", r["teacher"], teacher_task, t_sections, rc.sft, init_from=base, then=rc.sft_then)
    prepared("student", built["student"], task, s_sections, cfg.sft_student)
    out: dict[str, Any] = {"teacher_accuracy": acc["teacher"], "student_accuracy": acc["student"]}
    n_stats = int(cfg.rollout.prompts_per_step) * int(cfg.rollout.group_size)
    out.update(teacher_rollout_stats(cfg, models["teacher"], teacher_task,
                                     teacher_task.items("eval", n_stats, int(cfg.eval_seed))))
    route = Route(name=name, task=task, teacher=models["teacher"], mapping=r["mapping"],
                  train_items=task.items("train", int(cfg.train_problems), int(cfg.train_seed)))
    s1 = step1(cfg, models["student"], route, log=log)
    out.update({k: s1[k] for k in ("neg_reward_frac_step1", "gap_iqr_ratio", "endorsed_loop_frac")})
    shared = r["mapping"] is None
    student_eos, teacher_eos = task.tokenizer.eos_id, teacher_task.tokenizer.eos_id
    differ = shared and (student_eos != teacher_eos
                         or task.tokenizer.think_open_id != teacher_task.tokenizer.think_open_id)
    out["eos_logprob_mapped"] = s1["eos_teacher_logprob"] if differ else None
    if cfg.capacity_sft_steps == 0:
        log("[regime] capacity check skipped (capacity_sft_steps=0): R2 not measured")
        out["capacity_accuracy"] = None
    else:
        log(f"[regime] measured before the capacity check: {json.dumps(out, default=float)}")
        prepared("capacity", built["student"], teacher_task, c_sections, capacity_sft)
        out["capacity_accuracy"] = acc["capacity"]
    out["_context"] = {"budget": int(task.max_response_len), "shared_vocabulary": shared,
                       "conventions_differ": differ, "special_tokens": s1["special_tokens"],
                       "teacher_truncated_frac": out.pop("teacher_truncated_frac"),
                       "seconds": round(time.time() - t0, 1)}
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="opd")
@entry_point
def main(cfg: DictConfig) -> None:
    built = validate(cfg)  # ConfigError -> one line on stderr, exit 2
    if cfg.compile_cache is not None:  # before the first compilation
        from opd import compile_cache

        compile_cache.enable(cfg.compile_cache)
    r = measure(cfg, built)
    ctx = r.pop("_context")
    passed = passes(r, budget=ctx["budget"], shared_vocabulary=ctx["shared_vocabulary"],
                    conventions_differ=ctx["conventions_differ"])
    progress(f"[regime] context {json.dumps(ctx)}")
    print(report_line(r, passed), flush=True)


_GROUPS = {"loss": "loss", "rollout": "rollout", "optimizer": "optimizer", "experiment": "experiment"}

if __name__ == "__main__":
    if not any(a.split("=", 1)[0].lstrip("+~") == "experiment" for a in sys.argv[1:]):
        sys.argv.append("experiment=regime")
    run_main(main, _GROUPS, "opd")

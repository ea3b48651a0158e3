"""Exact bias and variance of top-K support variants, vOPD and the controls on enumerable models (issue 13).

Every estimator here is the gradient of one per-position objective of `opd.losses` (the trainer's
functions), evaluated at every prefix row c and every sampled token y of a tabular model:

    H[c, y] = ∇_{logits(c)} ℓ(logits(c), y; teacher(c))           [R, V(y), V]

with the sampler on-policy (π_old = π, detached). One rollout y_1..y_T gives the estimate
ĝ(y) = Σ_t e_{c_t} ⊗ H[c_t, y_t], and enumerating all V^T sequences gives its exact mean and variance
(Σ_y p(y)‖ĝ(y) − E ĝ‖², one sequence per estimate, Frobenius — the convention of synthetic.exact).

Bias is reported against two targets:
    token level     ∇_tok = Σ_c P(c) ∇KL(π(·|c) ‖ q(·|c)), the mean of the full-vocabulary per-prefix reverse
                    KL (paper Eq. 4): what every per-position objective approximates, so ‖E ĝ − ∇_tok‖ isolates
                    the support truncation (the reviewer's question "bias of LSM as a function of K");
    sequence level  ∇KL(π‖q) over whole sequences (synthetic.exact.sequence_kl_and_grad): the paper's
                    objective, which per-position objectives miss by the future-coupling term as well.
For T = 1 the two coincide.

Models: the student is a blurred, noisy copy of the teacher (logits 0.5·teacher + N(0, 1)). Teachers are
"random" (Gaussian logits, scale 2) or "multimodal": every row has top-1 mass m ∈ [0.5, 0.9], a second
mode holding 50-80% of the rest, and the remainder spread at random.

    python -m synthetic.support_study --out results/sandbox/support      # rows.jsonl + config.json

writes one row per (family, seed, horizon, estimator, K); paper_figs/fig_support_*.py read only those rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from opd import losses as L
from synthetic import exact, tabular

BOX_COX_ALPHA = 1.0
CONSTANT_ADVANTAGE = -1.0

# name -> (needs K, summary). Sampled-token objectives go through ppo_clip_loss at ratio 1 (on-policy).
ESTIMATORS: dict[str, tuple[bool, str]] = {
    "full_rkl": (False, "full-vocabulary per-prefix reverse KL (Eq. 4)"),
    "sampled_token": (False, "REINFORCE with A = log q(y) − log π(y) (Eq. 2/5)"),
    "vopd_full": (False, "vOPD: A + KL(π‖q) over the full vocabulary"),
    "box_cox": (False, f"PowerOPD Box-Cox reward, α = {BOX_COX_ALPHA}"),
    "constant": (False, f"constant advantage {CONSTANT_ADVANTAGE} (no teacher)"),
    "vopd_topk_teacher": (True, "vOPD with the KL partial sum over the teacher's top-K as baseline"),
    "vopd_topk_student": (True, "vOPD with the KL partial sum over the student's top-K as baseline"),
    "lsm": (True, "V1: teacher top-K, renormalized (LSM)"),
    "lsm_no_renorm": (True, "teacher top-K partial sum, no renormalization"),
    "stop_grad_topk": (True, "teacher top-K partial sum with the log ratio detached"),
    "topk_tail": (True, "teacher top-K + one tail bin"),
    "v2": (True, "student top-K ∪ {y}, renormalized"),
    "v3": (True, "teacher top-K ∪ {y}, renormalized"),
    "v4": (True, "EMA-PG head + tail, student top-K"),
    "v5": (True, "EMA-PG head + tail, teacher top-K"),
}
FAMILIES = ("random", "multimodal")


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def multimodal_teacher_logits(rng: np.random.Generator, rows: int, vocab: int,
                              top1_mass: tuple[float, float] = (0.5, 0.9)) -> np.ndarray:
    """[rows, V] teacher logits: top-1 mass drawn from U(top1_mass), a second mode with 50-80% of the rest,
    the remainder Dirichlet(1)-spread over the other V − 2 tokens, token order permuted per row."""
    lo, hi = top1_mass
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"top1_mass must satisfy 0 < low <= high < 1, got {top1_mass}")
    if vocab < 3:
        raise ValueError(f"vocab must be >= 3 for a two-mode teacher with a tail, got {vocab}")
    m = rng.uniform(lo, hi, rows)
    second = (1.0 - m) * rng.uniform(0.5, 0.8, rows)
    rest = (1.0 - m - second)[:, None] * rng.dirichlet(np.ones(vocab - 2), rows)
    probs = np.concatenate([m[:, None], second[:, None], rest], axis=1)
    perm = np.argsort(rng.random((rows, vocab)), axis=1)
    probs = np.take_along_axis(probs, perm, axis=1)
    return np.log(np.maximum(probs, 1e-300))


def make_pair(family: str, vocab: int, horizon: int, seed: int,
              top1_mass: tuple[float, float] = (0.5, 0.9)) -> tuple[np.ndarray, np.ndarray]:
    """(student_logits, teacher_logits), tabular tables [(V^T − 1)/(V − 1), V], float64."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tabular.validate_sizes(vocab, horizon)
    rng = np.random.default_rng(seed)
    rows = tabular.num_prefixes(vocab, horizon)
    if family == "random":
        teacher = 2.0 * rng.normal(size=(rows, vocab))
    else:
        teacher = multimodal_teacher_logits(rng, rows, vocab, top1_mass)
    student = 0.5 * teacher + rng.normal(size=(rows, vocab))
    return student, teacher


# ---------------------------------------------------------------------------------------------------------
# Per-position objectives, all through opd.losses
# ---------------------------------------------------------------------------------------------------------


def _position_loss(name: str, k: int):
    """ℓ(z_V, t_V, y): the objective `name` at one position, on-policy (π_old = sg π)."""

    def loss(z_V, t_V, y):
        lq_V = jax.nn.log_softmax(t_V)
        lp_V = jax.nn.log_softmax(z_V)
        old_y = jax.lax.stop_gradient(lp_V[y])
        if k:
            t_lp_K, t_ids_K = jax.lax.top_k(lq_V, k)

        def policy_gradient(advantage):
            return L.ppo_clip_loss(lp_V[y], old_y, advantage)

        if name == "full_rkl":
            return L.full_reverse_kl(z_V, t_V)
        if name == "sampled_token":
            return policy_gradient(L.sampled_token_advantage(old_y, lq_V[y]))
        if name == "vopd_full":
            return policy_gradient(L.sampled_token_advantage(old_y, lq_V[y], kl_baseline=L.full_reverse_kl(z_V, t_V)))
        if name == "box_cox":
            return policy_gradient(L.sampled_token_advantage(old_y, lq_V[y], reward="box_cox", alpha=BOX_COX_ALPHA))
        if name == "constant":
            return policy_gradient(L.constant_advantage(old_y, CONSTANT_ADVANTAGE))
        if name in ("v2", "v4", "vopd_topk_student"):
            ids_K, lq_K = L.student_topk_support(z_V, t_V, k)
        else:
            ids_K, lq_K = t_ids_K, t_lp_K
        if name in ("vopd_topk_teacher", "vopd_topk_student"):
            baseline = L.topk_reverse_kl(z_V, ids_K, lq_K, renormalize=False)
            return policy_gradient(L.sampled_token_advantage(old_y, lq_V[y], kl_baseline=baseline))
        if name == "lsm":
            return L.topk_reverse_kl(z_V, ids_K, lq_K, renormalize=True)
        if name == "lsm_no_renorm":
            return L.topk_reverse_kl(z_V, ids_K, lq_K, renormalize=False)
        if name == "stop_grad_topk":
            return L.stop_gradient_topk_reverse_kl(z_V, ids_K, lq_K)
        if name == "topk_tail":
            return L.topk_reverse_kl_with_tail(z_V, ids_K, lq_K)
        if name in ("v2", "v3"):
            return L.union_sampled_reverse_kl(z_V, ids_K, lq_K, y, lq_V[y])
        if name in ("v4", "v5"):
            return L.ema_pg_loss(z_V, ids_K, lq_K, y, old_y, lq_V[y])
        raise AssertionError(name)  # names are validated before tracing

    return loss


@functools.partial(jax.jit, static_argnames=("name", "k"))
def _position_grads_impl(student_RxV, teacher_RxV, *, name, k):
    grad = jax.grad(_position_loss(name, k))
    over_y = jax.vmap(grad, in_axes=(None, None, 0))
    over_rows = jax.vmap(over_y, in_axes=(0, 0, None))
    return over_rows(student_RxV, teacher_RxV, jnp.arange(student_RxV.shape[-1]))


def _validate_estimator(name: str, k: int | None, vocab: int) -> int:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}")
    if not ESTIMATORS[name][0]:
        if k is not None:
            raise ValueError(f"estimator {name!r} takes no k, got k={k}")
        return 0
    if k is None or int(k) != k or not 1 <= int(k) <= vocab:
        raise ValueError(f"estimator {name!r} needs an integer k with 1 <= k <= V={vocab}, got {k}")
    return int(k)


def position_grads(student_logits, teacher_logits, name: str, k: int | None = None) -> np.ndarray:
    """H[c, y] = ∇_{logits(c)} ℓ_name at every row c and sampled token y: float64 [R, V, V]."""
    vocab, _ = tabular.validate_logits(student_logits, teacher_logits)
    k = _validate_estimator(name, k, vocab)
    with jax.enable_x64(True):
        out = _position_grads_impl(jnp.asarray(student_logits, jnp.float64),
                                   jnp.asarray(teacher_logits, jnp.float64), name=name, k=k)
        return np.asarray(out, np.float64)


# ---------------------------------------------------------------------------------------------------------
# Exact moments by enumeration (dense: every sequence's whole gradient table)
# ---------------------------------------------------------------------------------------------------------


def sequence_probs(student_logits) -> np.ndarray:
    """p(y) of all V^T sequences, in tabular.enumerate_sequences order, float64."""
    vocab, horizon = tabular.validate_logits(student_logits)
    logp_RxV = _log_softmax(student_logits)
    tokens_NxT = tabular.enumerate_sequences(vocab, horizon)
    rows_NxT = tabular.prefix_index_table(vocab, horizon)
    return np.exp(np.sum(logp_RxV[rows_NxT, tokens_NxT], axis=1))


def _log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def per_sequence_estimates(student_logits, grads_RxVxV) -> np.ndarray:
    """ĝ(y) for every sequence: dense [V^T, R, V] (row c_t of sequence y holds H[c_t, y_t])."""
    vocab, horizon = tabular.validate_logits(student_logits)
    rows = tabular.num_prefixes(vocab, horizon)
    if np.shape(grads_RxVxV) != (rows, vocab, vocab):
        raise ValueError(f"grads must have shape {(rows, vocab, vocab)}, got {np.shape(grads_RxVxV)}")
    tokens_NxT = tabular.enumerate_sequences(vocab, horizon)
    rows_NxT = tabular.prefix_index_table(vocab, horizon)
    g_NxRxV = np.zeros((tokens_NxT.shape[0], rows, vocab))
    n_NxT = np.broadcast_to(np.arange(tokens_NxT.shape[0])[:, None], rows_NxT.shape)
    g_NxRxV[n_NxT, rows_NxT] = np.asarray(grads_RxVxV)[rows_NxT, tokens_NxT]  # rows of a sequence are distinct
    return g_NxRxV


def moments(student_logits, grads_RxVxV) -> tuple[np.ndarray, float]:
    """(E ĝ [R, V], Σ_y p(y)‖ĝ(y) − E ĝ‖²) by enumerating every sequence, float64."""
    p_N = sequence_probs(student_logits)
    g_NxRxV = per_sequence_estimates(student_logits, grads_RxVxV)
    mean = np.einsum("n,nrv->rv", p_N, g_NxRxV)
    variance = float(np.einsum("n,n->", p_N, np.sum((g_NxRxV - mean) ** 2, axis=(1, 2))))
    return mean, variance


def prefix_probs(student_logits) -> np.ndarray:
    """P(c) for every prefix row (the root has 1), float64 [R]."""
    vocab, horizon = tabular.validate_logits(student_logits)
    pi_RxV = np.exp(_log_softmax(student_logits))
    offsets = tabular.prefix_offsets(vocab, horizon)
    probs = [np.ones(1)]
    for t in range(horizon - 1):
        probs.append((probs[-1][:, None] * pi_RxV[offsets[t]:offsets[t + 1]]).reshape(-1))
    return np.concatenate(probs)


def topk_coverage(student_logits, teacher_logits, k: int) -> dict[str, float]:
    """Prefix-weighted per-step means of the teacher's top-k mass and of the student's mass on it."""
    _, horizon = tabular.validate_logits(student_logits, teacher_logits)
    w_R = prefix_probs(student_logits) / horizon
    q_RxV, pi_RxV = np.exp(_log_softmax(teacher_logits)), np.exp(_log_softmax(student_logits))
    ids_RxK = np.argsort(-q_RxV, axis=1, kind="stable")[:, :k]
    return {"teacher_topk_mass": float(w_R @ np.take_along_axis(q_RxV, ids_RxK, 1).sum(1)),
            "student_mass_on_teacher_topk": float(w_R @ np.take_along_axis(pi_RxV, ids_RxK, 1).sum(1))}


# ---------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------


def _targets(student_logits, teacher_logits, full_rkl_grads_RxVxV) -> tuple[np.ndarray, np.ndarray]:
    """(∇_tok, ∇_seq): the token-level full-RKL gradient (mean of the full_rkl estimator) and the exact
    gradient of the sequence-level KL."""
    target_tok, _ = moments(student_logits, full_rkl_grads_RxVxV)
    _, target_seq = exact.sequence_kl_and_grad(student_logits, teacher_logits)
    return target_tok, target_seq


def _row(name, k, mean, variance, target_tok, target_seq) -> dict:
    norm_tok, norm_seq = float(np.linalg.norm(target_tok)), float(np.linalg.norm(target_seq))
    bias_tok, bias_seq = float(np.linalg.norm(mean - target_tok)), float(np.linalg.norm(mean - target_seq))
    return {"estimator": name, "k": k, "variance": variance, "bias_tok": bias_tok, "bias_seq": bias_seq,
            "rel_bias_tok": bias_tok / norm_tok, "rel_bias_seq": bias_seq / norm_seq,
            "mean_sq": float(np.sum(mean**2)), "grad_tok_norm": norm_tok, "grad_seq_norm": norm_seq}


def estimator_rows(student_logits, teacher_logits, estimators=None, ks=None, *,
                   also_root: bool = False) -> list[dict]:
    """One row per (estimator, K) for one model: exact bias against both targets and exact variance.

    also_root=True adds the same rows for the T = 1 model made of the root row alone (the per-position
    case), reusing the root's gradients; every row carries its `horizon`."""
    vocab, horizon = tabular.validate_logits(student_logits, teacher_logits)
    estimators = list(ESTIMATORS) if estimators is None else list(estimators)
    ks = list(range(1, vocab + 1)) if ks is None else [int(k) for k in ks]
    for k in ks:  # every argument checked before any computation
        if not 1 <= k <= vocab:
            raise ValueError(f"ks must lie in [1, V={vocab}], got {k}")
    for name in estimators:
        _validate_estimator(name, ks[0] if ESTIMATORS.get(name, (False,))[0] else None, vocab)
    models = [(horizon, student_logits, teacher_logits, slice(None))]
    if also_root and horizon > 1:
        models.append((1, np.asarray(student_logits)[:1], np.asarray(teacher_logits)[:1], slice(0, 1)))
    full = position_grads(student_logits, teacher_logits, "full_rkl")
    targets = {t: _targets(s, q, full[rows]) for t, s, q, rows in models}
    out = []
    for name in estimators:
        for k in ks if ESTIMATORS[name][0] else [None]:
            grads = position_grads(student_logits, teacher_logits, name, k)
            for t, s, q, rows in models:
                mean, variance = moments(s, grads[rows])
                row = {"horizon": t, **_row(name, k, mean, variance, *targets[t])}
                if k is not None:
                    row.update(topk_coverage(s, q, k))
                out.append(row)
    return out


def run_study(*, vocab: int = 8, horizon: int = 3, seeds: int = 8,
              families=(("random", None), ("multimodal", (0.5, 0.9)), ("multimodal", (0.5, 0.6)),
                        ("multimodal", (0.8, 0.9))),
              estimators=None) -> list[dict]:
    """Rows for every family × seed, at horizon T (`horizon`) and at T = 1 (the model's root row)."""
    tabular.validate_sizes(vocab, horizon)
    out = []
    for family, top1 in families:
        for seed in range(seeds):
            student, teacher = make_pair(family, vocab, horizon, seed, top1 or (0.5, 0.9))
            for row in estimator_rows(student, teacher, estimators, also_root=True):
                out.append({"family": family, "top1_mass": list(top1) if top1 else None, "seed": seed,
                            "vocab": vocab, **row})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/sandbox/support")
    parser.add_argument("--vocab", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)
    start = time.time()
    rows = run_study(vocab=args.vocab, horizon=args.horizon, seeds=args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"vocab": args.vocab, "horizon": args.horizon, "seeds": args.seeds,
              "estimators": {k: v[1] for k, v in ESTIMATORS.items()}, "box_cox_alpha": BOX_COX_ALPHA,
              "constant_advantage": CONSTANT_ADVANTAGE, "seconds": round(time.time() - start, 1)}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    print(f"wrote {len(rows)} rows to {out / 'rows.jsonl'} ({config['seconds']} s)")


if __name__ == "__main__":
    main()

"""Future-reward coupling study (a): a tabular student trained by SGD with ĝ_γ toward a fixed teacher.

One traceable function per experiment (purejaxrl style): `make_run(cfg) -> run(rng, gamma)`, and the
caller does `jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))(seed_keys, gammas)`, so every seed ×
γ pair runs in one device call. Everything is float64 (call under `jax.enable_x64(True)`).

Per iteration i, before the update, with θ_i the student logits:
  kl          exact sequence-level KL(π_θ ‖ q)                     (enumerated, synthetic.exact)
  variance    exact single-sequence variance E‖ĝ_γ − Eĝ_γ‖²        (synthetic.exact, same estimator)
  bias        ‖E ĝ_γ − ∇KL‖
  grad_norm   ‖batch estimate‖ actually used in the update
  instability max(0, KL_{i+1} − KL_i) / KL_i: the relative KL *increase* the SGD step caused (0 when the
              step did not make the objective worse). Averages of it over iterations measure how often and
              how badly noisy steps push the student away from the teacher; its max is the worst spike.
Update: θ ← θ − lr · (1/B) Σ_b ĝ_γ(y_b), y_b ~ π_θ (Monte Carlo batch of B sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from synthetic import exact, tabular
from synthetic.estimators import discounted_coefficients, tabular_score, token_costs


@dataclass(frozen=True)
class SGDStudyConfig:
    vocab: int = 3
    horizon: int = 6
    teacher_scale: float = 2.0  # teacher logits ~ N(0, scale²): sharper teachers give larger |r_t|
    student_scale: float = 0.1  # initial student logits ~ N(0, scale²) (near uniform)
    teacher_seed: int = 0  # the teacher is shared by every seed and γ
    lr: float = 0.5
    batch_size: int = 16
    num_iters: int = 400


def make_run(cfg: SGDStudyConfig):
    tabular.validate_sizes(cfg.vocab, cfg.horizon)
    rows = tabular.num_prefixes(cfg.vocab, cfg.horizon)
    teacher_RxV = cfg.teacher_scale * jax.random.normal(jax.random.key(cfg.teacher_seed), (rows, cfg.vocab),
                                                        dtype=jnp.float64)
    chunk = min(cfg.vocab**cfg.horizon, exact.DEFAULT_CHUNK)

    def moments(student_RxV, gamma):
        return exact.moments_traced(student_RxV, teacher_RxV, gamma, vocab=cfg.vocab, horizon=cfg.horizon,
                                    kind="discounted", chunk=chunk)

    def batch_estimate(key, student_RxV, gamma):
        tok_BxT, rows_BxT = tabular.sample_tabular(key, student_RxV, cfg.horizon, cfg.batch_size)
        logp_RxV = jax.nn.log_softmax(student_RxV, -1)
        logq_RxV = jax.nn.log_softmax(teacher_RxV, -1)
        r_BxT = token_costs(logp_RxV[rows_BxT, tok_BxT], logq_RxV[rows_BxT, tok_BxT])
        c_BxT = jax.vmap(discounted_coefficients, (0, None))(r_BxT, gamma)
        score_BxTxV = jax.vmap(jax.vmap(tabular_score))(student_RxV[rows_BxT], tok_BxT)
        est_RxV = jnp.zeros_like(student_RxV).at[rows_BxT].add(c_BxT[..., None] * score_BxTxV)
        return est_RxV / cfg.batch_size

    def run(rng, gamma):
        init_key, loop_key = jax.random.split(rng)
        student_RxV = cfg.student_scale * jax.random.normal(init_key, (rows, cfg.vocab), dtype=jnp.float64)

        # SGD ITERATION: exact diagnostics at θ_i, one Monte Carlo step, exact KL after it
        def sgd_iteration(student_RxV, key):
            m = moments(student_RxV, gamma)
            est_RxV = batch_estimate(key, student_RxV, gamma)
            new_RxV = student_RxV - cfg.lr * est_RxV
            kl_next, _, _ = exact.kl_dp(jax.nn.log_softmax(new_RxV, -1), jax.nn.log_softmax(teacher_RxV, -1),
                                        cfg.vocab, cfg.horizon)
            metrics = {
                "kl": m.kl,
                "variance": m.variance,
                "bias": m.bias,
                "grad_norm": jnp.sqrt(jnp.sum(est_RxV**2)),
                "exact_grad_norm": jnp.sqrt(jnp.sum(m.grad**2)),
                "instability": jnp.maximum(kl_next - m.kl, 0.0) / m.kl,
            }
            return new_RxV, metrics

        final_RxV, metrics = jax.lax.scan(sgd_iteration, student_RxV, jax.random.split(loop_key, cfg.num_iters))
        return metrics, final_RxV

    return run

"""Worst-case variance bounds and the constructions that probe how tight they are.

Paper (App. B.2), with |r_t| ≤ B_r and ‖g_t‖ ≤ B_g and Var(X) ≤ E‖X‖²:
    token level (γ = 0):          Var ≤ T² B_r² B_g²
    sequence level (Eq. 1):       Var ≤ T⁴ B_r² B_g²
Ours (not in the paper):
    discounted γ ∈ [0, 1]:        Var ≤ B_r² B_g² T² min(T, 1/(1−γ))²      (‖ĝ_γ‖ ≤ B_r B_g Σ_t Σ_k γ^k)
    full return, tight order:     Var ≤ T³ B_r² B_g²   since G = Σ_t g_t is a martingale (E[g_t|c_t] = 0):
                                  E‖RG‖² ≤ (T B_r)² E‖G‖² = (T B_r)² Σ_t E‖g_t‖² ≤ T³ B_r² B_g².
    all γ (incl. shared parameters): Var ≤ B_r² B_g² T² min(T, 1/(1−γ²))   (`martingale_gamma_bound`)
So no model reaches the T⁴ growth of the paper's sequence-level bound; T³ is attained (below).

Constructions (V = 2 tokens {0, 1}; each returns tabular (student, teacher) logit tables plus an optional
`tie` so that exact moments are taken w.r.t. shared parameters):
  * `worst_full_return`: tabular, every prefix has student π = (½, ½) and teacher q = (1 − δ, δ). Each step
    has the same KL κ > 0, so R ≈ κT with fluctuations O(√T), while ‖G‖² = Σ_t ‖e_{y_t} − π‖² = T/2
    exactly (distinct rows). Var ≈ κ²T³/2: slope 3 (the tight order).
  * `worst_token`: parameters shared across steps and tied by the *first* token: y_1 is uniform, every
    later token is drawn from the row of y_1 (student uniform, teacher (1 − δ, δ) leaning towards y_1).
    The conditional mean of r_t g_t is ∇KL(row y_1), a vector living in the row chosen once per sequence,
    so Σ_t r_t g_t ≈ (T − 1)·∇KL_{y_1} + O(√T) noise and Var(ĝ_tok) ≈ T²/4 ‖∇KL_0 − ∇KL_1‖² + O(T):
    slope → 2, the paper's order. In a tabular model the rows are distinct, so
    ‖ĝ_tok‖² = Σ_t r_t²‖g_t‖² ≤ T B_r² B_g²: the
    token-level variance is only O(T) there.
"""

from __future__ import annotations

import numpy as np

from synthetic import tabular


def token_bound(horizon, b_r, b_g):
    """T² B_r² B_g² (paper App. B.2, token level)."""
    return horizon**2 * b_r**2 * b_g**2


def sequence_bound(horizon, b_r, b_g):
    """T⁴ B_r² B_g² (paper App. B.2, sequence level)."""
    return horizon**4 * b_r**2 * b_g**2


def gamma_bound(horizon, b_r, b_g, gamma):
    """B_r² B_g² T² min(T, 1/(1−γ))² — our extension to the discounted family (not in the paper).
    γ = None (full return) gives the sequence bound."""
    if gamma is None or gamma >= 1.0:
        eff = horizon
    else:
        eff = min(horizon, 1.0 / (1.0 - gamma))
    return b_r**2 * b_g**2 * horizon**2 * eff**2


def full_return_tight_bound(horizon, b_r, b_g):
    """T³ B_r² B_g² (ours): the martingale argument above; also bounds γ = 1 up to the same order."""
    return horizon**3 * b_r**2 * b_g**2


def martingale_gamma_bound(horizon, b_r, b_g, gamma):
    """B_r² B_g² T² min(T, 1/(1−γ²)) — ours, for any parameterization (shared parameters included).

    ĝ_γ = Σ_{t'} r_{t'} M_{t'} with M_{t'} = Σ_{t≤t'} γ^{t'−t} g_t. The g_t are martingale differences
    (E[g_t | c_t] = 0, g_s known at c_t for s < t), so E‖M_{t'}‖² = Σ_k γ^{2k} E‖g‖² ≤ B_g² min(t', 1/(1−γ²)),
    and Minkowski gives ‖ĝ_γ‖_{L2} ≤ B_r B_g T √min(T, 1/(1−γ²)). γ = 0 recovers the paper's T²; γ = 1
    gives T³ (not T⁴). γ = None (full return RG): ‖RG‖ ≤ T B_r ‖G‖ and E‖G‖² ≤ T B_g², also T³.
    """
    if gamma is None or gamma >= 1.0:
        eff = horizon
    else:
        eff = min(horizon, 1.0 / (1.0 - gamma**2))
    return b_r**2 * b_g**2 * horizon**2 * eff


def tabular_gamma_bound(horizon, b_r, b_g, gamma):
    """Tabular model only (distinct row per step, ours): ‖ĝ_γ‖² = Σ_t c_t² ‖g_t‖², so
    Var ≤ T B_r² B_g² min(T, 1/(1−γ))² (γ = None: T³ B_r² B_g²)."""
    if gamma is None or gamma >= 1.0:
        eff = horizon
    else:
        eff = min(horizon, 1.0 / (1.0 - gamma))
    return horizon * b_r**2 * b_g**2 * eff**2


def worst_full_return(horizon: int, delta: float = 0.1) -> tuple[np.ndarray, np.ndarray, None]:
    """Tabular V = 2: student uniform everywhere, teacher (1 − δ, δ) everywhere. Slope 3 for Eq. 1."""
    rows = tabular.num_prefixes(2, horizon)
    student = np.zeros((rows, 2))
    teacher = np.tile(np.log([1.0 - delta, delta]), (rows, 1))
    return student, teacher, None


def worst_token(horizon: int, delta: float = 0.1) -> tuple[np.ndarray, ...]:
    """Shared-parameter V = 2 model tied by the *first* token: y_1 ~ uniform (start row), then every later
    token is drawn i.i.d. from the row of y_1. Student rows uniform; teacher row for first token a puts
    1 − δ on a. Returns tabular tables and the tie map (P = 3 shared rows: start, first=0, first=1)."""
    validate = tabular.num_prefixes(2, horizon)  # also validates sizes below via the tie construction
    tie = np.zeros(validate, dtype=np.int64)
    offsets = tabular.prefix_offsets(2, horizon)
    for t in range(1, horizon):
        first = np.arange(2**t) // 2 ** (t - 1)
        tie[offsets[t] : offsets[t + 1]] = 1 + first
    lean = np.log([1.0 - delta, delta])
    shared_student = np.zeros((3, 2))
    shared_teacher = np.stack([np.zeros(2), lean, lean[::-1]])
    return shared_student[tie], shared_teacher[tie], tie


def fit_loglog_slope(horizons, values) -> float:
    """Least-squares slope of log(values) against log(horizons)."""
    x, y = np.log(np.asarray(horizons, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])

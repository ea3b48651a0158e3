"""Worst-case variance bounds and the constructions that probe how tight they are.

Paper (App. B.2), with |r_t| ≤ B_r and ‖g_t‖ ≤ B_g and Var(X) ≤ E‖X‖²:
    token level (γ = 0):          Var ≤ T² B_r² B_g²
    sequence level (Eq. 1):       Var ≤ T⁴ B_r² B_g²
Ours (not in the paper):
    discounted γ ∈ [0, 1]:        Var ≤ B_r² B_g² T² min(T, 1/(1−γ))²      (‖ĝ_γ‖ ≤ B_r B_g Σ_t Σ_k γ^k)
    full return, tight order:     Var ≤ T³ B_r² B_g²   since G = Σ_t g_t is a martingale (E[g_t|c_t] = 0):
                                  E‖RG‖² ≤ (T B_r)² E‖G‖² = (T B_r)² Σ_t E‖g_t‖² ≤ T³ B_r² B_g².
    all γ (incl. shared parameters): Var ≤ B_r² B_g² T² min(T, 1/(1−γ²))   (`martingale_gamma_bound`)
So with tokens drawn from π itself (on-policy) no model reaches the T⁴ growth of the paper's sequence-level
bound; T³ is attained (below). The martingale step needs E[g_t | c_t] = 0, i.e. on-policy tokens: under a
behaviour β ≠ π (top-p / top-k / greedy rollouts, stale PPO minibatches) E_β[g_t | c_t] = β − π ≠ 0, the
score sum grows linearly, and T⁴ is reached (`worst_off_policy`). All bounds assume bounded r_t.

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
  * `worst_causal`: tabular, student (p, 1 − p) and teacher (1 − δ, δ) everywhere with the student's likely
    token the teacher's unlikely one, so the mean cost (the per-step KL κ) dominates its fluctuation.
    Var(ĝ_1) ≈ κ² Σ_t (T − t)² E‖g‖² and Var(ĝ_seq) ≈ κ² T² · T E‖g‖²: slope 3 for the causal γ = 1
    and the full-return estimators (on-policy).
  * `worst_off_policy`: rows tied by the first token, student start row uniform, row "first = a" puts
    1 − ε on a; a top-p behaviour (½ < top_p ≤ 1 − ε) samples the first token and then repeats it. The scores
    no longer average out: G = Σ_t g_t = (T − 1)(e_a − π_a) + O(1) and R ≈ T r, so Var(ĝ_seq) ∝ T²(T − 1)²
    (slope 4, the paper's order), and the same for ĝ_1.
  * `worst_gamma`: V = 3, rows shared after the first token (start row separate), student uniform. The
    first token sets a sign σ; the teacher at each later prefix makes r large exactly on the tokens y whose
    discounted score sum X_t = ⟨u, Σ_{s≤t} γ^{t−s} g_s⟩ (u = e_0 − π) has σX_t > 0, and r = 0 when no token
    does. Then Σ_t r_t X_t ≈ σ · T · c · E[X⁺] with E[X⁺] ∝ 1/√(1−γ²) once T ≫ 1/(1−γ): Var(ĝ_γ) grows as
    T²/(1 − γ²), the shape of `martingale_gamma_bound`. Per-step scores keep a γ-independent floor, so the
    1/(1−γ²) growth is visible for γ ≤ 7/8 at enumerable horizons (T = 8 at V = 3).
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
    """B_r² B_g² T² min(T, 1/(1−γ²)) — ours, for any parameterization (shared parameters included), with
    tokens drawn from the student itself (on-policy); off-policy it fails (`worst_off_policy`).

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
    tie = first_token_tie(2, horizon)
    lean = np.log([1.0 - delta, delta])
    shared_student = np.zeros((3, 2))
    shared_teacher = np.stack([np.zeros(2), lean, lean[::-1]])
    return shared_student[tie], shared_teacher[tie], tie


def worst_causal(horizon: int, p: float = 0.3, delta: float = 1e-3) -> tuple[np.ndarray, np.ndarray, None]:
    """Tabular V = 2: student (p, 1 − p), teacher (1 − δ, δ) at every prefix. The student's likely token 1
    costs r = log((1 − p)/δ) > 0, so the mean cost per step κ (the per-prefix KL) dominates its spread and
    the T³ term shows at small T. Slope 3 for γ = 1 and Eq. 1, on-policy."""
    if not 0.0 < p < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"p and delta must lie in (0, 1), got p={p}, delta={delta}")
    rows = tabular.num_prefixes(2, horizon)
    student = np.tile(np.log([p, 1.0 - p]), (rows, 1))
    teacher = np.tile(np.log([1.0 - delta, delta]), (rows, 1))
    return student, teacher, None


def first_token_tie(vocab: int, horizon: int) -> np.ndarray:
    """Prefix row -> parameter row: 0 for the empty prefix, 1 + y_1 for every longer prefix (P = V + 1)."""
    tabular.validate_sizes(vocab, horizon)
    tie = np.zeros(tabular.num_prefixes(vocab, horizon), dtype=np.int64)
    offsets = tabular.prefix_offsets(vocab, horizon)
    for t in range(1, horizon):
        tie[offsets[t] : offsets[t + 1]] = 1 + np.arange(vocab**t) // vocab ** (t - 1)
    return tie


def worst_off_policy(horizon: int, eps: float = 0.4, delta: float = 0.01) -> tuple[np.ndarray, ...]:
    """V = 2, rows tied by the first token (`first_token_tie`). Student: start row uniform, row of first
    token a puts 1 − ε on a. Teacher: row of a puts δ on a (so r = log((1 − ε)/δ) on every repeat); start row
    chosen so r(start, 0) equals it (q = ½e^{−r} on 0). With the student's top-p behaviour for any
    top_p in (½, 1 − ε] (`synthetic.behaviour.behaviour_table`, e.g. 0.55), y_1 is random and every later
    token repeats it. Returns (student, teacher, tie)."""
    if not 0.0 < eps < 0.5 or not 0.0 < delta < 1.0 - eps:
        raise ValueError(f"need 0 < eps < 0.5 and 0 < delta < 1 - eps, got eps={eps}, delta={delta}")
    tie = first_token_tie(2, horizon)
    r = np.log((1.0 - eps) / delta)
    q0 = 0.5 * np.exp(-r)
    shared_student = np.log([[0.5, 0.5], [1.0 - eps, eps], [eps, 1.0 - eps]])
    shared_teacher = np.log([[q0, 1.0 - q0], [delta, 1.0 - delta], [1.0 - delta, delta]])
    return shared_student[tie], shared_teacher[tie], tie


def worst_gamma(horizon: int, gamma: float, delta: float = 1e-3, vocab: int = 3) -> tuple[np.ndarray, ...]:
    """The T²/(1 − γ²) family (module docstring). Student uniform, rows after the first token shared
    (tie: 0 for the empty prefix, 1 otherwise); the teacher table is built per prefix for this γ.
    Returns (student, teacher, tie)."""
    tabular.validate_sizes(vocab, horizon)
    tabular.validate_gamma(gamma)
    if not 0.0 < delta < 1.0 / vocab:
        raise ValueError(f"delta must lie in (0, 1/V), got {delta}")
    rows = tabular.num_prefixes(vocab, horizon)
    offsets = tabular.prefix_offsets(vocab, horizon)
    tie = np.ones(rows, dtype=np.int64)
    tie[0] = 0
    pi = np.full(vocab, 1.0 / vocab)
    s_V = (np.eye(vocab) - pi) @ (np.eye(vocab)[0] - pi)  # ⟨u, e_y − π⟩, u = e_0 − π
    teacher = np.tile(np.log(pi), (rows, 1))
    for t in range(1, horizon):
        toks = tabular.enumerate_sequences(vocab, t)
        sigma = np.where(toks[:, 0] == 0, 1.0, -1.0)
        x = np.zeros(len(toks))
        for u in range(1, t):  # the shared rows' steps so far
            x = gamma * x + s_V[toks[:, u]]
        w_NxV = sigma[:, None] * (gamma * x[:, None] + s_V[None, :])  # σ X_t for each next token
        pos = w_NxV > 0
        q = np.where(pos, delta, 0.0)
        rest = 1.0 - q.sum(1)
        q = np.where(pos, q, rest[:, None] / np.maximum((~pos).sum(1), 1)[:, None])
        every = pos.all(1)  # all tokens rewarded: the least aligned one takes the remaining mass
        low = np.argmin(w_NxV, 1)
        q[every, low[every]] = rest[every] + delta
        q = np.where(pos.any(1)[:, None], q, pi)
        teacher[offsets[t] : offsets[t + 1]] = np.log(q)
    return np.zeros((rows, vocab)), teacher, tie


def fit_loglog_slope(horizons, values) -> float:
    """Least-squares slope of log(values) against log(horizons)."""
    x, y = np.log(np.asarray(horizons, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0])

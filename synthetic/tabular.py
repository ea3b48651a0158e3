"""Enumerable tabular autoregressive sequence models (the sandbox's exact path).

A tabular policy over vocabulary V and horizon T has one logit row per prefix y_<t, t = 0..T-1, in the
canonical order of design.md: prefixes of length 0..T-1, shortest first, lexicographic within a length.
The prefix (y_1..y_k) of length k sits at row

    offset_k + Σ_i y_i V^(k-1-i),   offset_k = (V^k - 1) / (V - 1),

so the table has R = (V^T - 1) / (V - 1) rows and shape [R, V]. Sequence n ∈ [0, V^T) is the base-V
expansion of n (most significant token first); its step-t prefix row is offset_t + n // V^(T-t). Both
maps are integer arithmetic, so chunks of sequences are built on the fly inside jitted code and the
[V^T, T] index table never has to exist in the exact engine (it is still available for tests).

For horizons too long to enumerate use `synthetic.markov` (Monte Carlo).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ENUMERATION_LIMIT = 1_000_000
"""Largest V^T the exact engine enumerates (all sequences, float64)."""


def validate_sizes(vocab: int, horizon: int, *, limit: int = ENUMERATION_LIMIT) -> None:
    """One clear ValueError for sizes the exact (enumerating) path cannot take."""
    if int(vocab) != vocab or vocab < 2:
        raise ValueError(f"vocab V must be an integer >= 2, got {vocab}")
    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon T must be an integer >= 1, got {horizon}")
    if vocab**horizon > limit:
        raise ValueError(
            f"V^T = {vocab}^{horizon} = {vocab**horizon} sequences exceeds the enumeration limit {limit}; "
            "use the Monte Carlo path in synthetic.markov (MarkovModel.sample / mc_estimates) instead"
        )


def validate_gamma(gamma: float | None) -> None:
    if gamma is None:
        return
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (or None for the full-return form), got {gamma}")


def num_prefixes(vocab: int, horizon: int) -> int:
    """R = (V^T - 1) / (V - 1): the number of logit rows of a tabular policy."""
    return (vocab**horizon - 1) // (vocab - 1)


def prefix_offsets(vocab: int, horizon: int) -> np.ndarray:
    """offset_k = (V^k - 1)/(V - 1) for k = 0..T: first row of each prefix length (offset_T = R)."""
    return np.array([(vocab**k - 1) // (vocab - 1) for k in range(horizon + 1)], dtype=np.int64)


def prefix_row(prefix: tuple[int, ...] | list[int], vocab: int) -> int:
    """Row id of one prefix (a tuple of tokens), canonical order."""
    k = len(prefix)
    value = 0
    for tok in prefix:
        value = value * vocab + int(tok)
    return (vocab**k - 1) // (vocab - 1) + value


def horizon_from_rows(num_rows: int, vocab: int) -> int | None:
    """T with (V^T - 1)/(V - 1) == num_rows, or None when no such T exists."""
    if vocab < 2 or num_rows < 1:
        return None
    total, power, t = 0, 1, 0
    while total < num_rows:
        total += power
        power *= vocab
        t += 1
    return t if total == num_rows else None


def validate_logits(student_logits, teacher_logits=None) -> tuple[int, int]:
    """Check a tabular logit table [R, V] (and the teacher's), return (V, T). ValueError otherwise."""
    shape = tuple(np.shape(student_logits))
    if len(shape) != 2:
        raise ValueError(f"student_logits must be a tabular table [R, V] (R = (V^T-1)/(V-1)), got shape {shape}")
    rows, vocab = shape
    if vocab < 2:
        raise ValueError(f"vocab V must be an integer >= 2, got V={vocab} (student_logits shape {shape})")
    horizon = horizon_from_rows(rows, vocab)
    if horizon is None:
        raise ValueError(
            f"student_logits has {rows} rows, which is not (V^T-1)/(V-1) for V={vocab} and any T >= 1; "
            "rows must be the canonical prefixes of length 0..T-1"
        )
    if teacher_logits is not None and tuple(np.shape(teacher_logits)) != shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {shape}, got {tuple(np.shape(teacher_logits))}"
        )
    validate_sizes(vocab, horizon)
    return vocab, horizon


def sequence_tokens(n, vocab: int, horizon: int):
    """Tokens [..., T] of sequence ids n (base-V digits, most significant first). Works under jit."""
    powers = jnp.asarray([vocab ** (horizon - 1 - t) for t in range(horizon)])
    return (jnp.asarray(n)[..., None] // powers) % vocab


def sequence_rows(n, vocab: int, horizon: int):
    """Prefix row ids [..., T] of sequence ids n: row at step t = offset_t + n // V^(T-t)."""
    offsets = jnp.asarray(prefix_offsets(vocab, horizon)[:horizon])
    powers = jnp.asarray([vocab ** (horizon - t) for t in range(horizon)])
    return offsets + jnp.asarray(n)[..., None] // powers


def enumerate_sequences(vocab: int, horizon: int) -> np.ndarray:
    """All V^T sequences as int tokens [V^T, T], in sequence-id order (vectorized)."""
    validate_sizes(vocab, horizon)
    n = np.arange(vocab**horizon, dtype=np.int64)
    powers = vocab ** np.arange(horizon - 1, -1, -1, dtype=np.int64)
    return (n[:, None] // powers) % vocab


def prefix_index_table(vocab: int, horizon: int) -> np.ndarray:
    """Row ids [V^T, T] of the prefix each sequence conditions on at each step (vectorized)."""
    validate_sizes(vocab, horizon)
    n = np.arange(vocab**horizon, dtype=np.int64)
    powers = vocab ** np.arange(horizon, 0, -1, dtype=np.int64)
    return prefix_offsets(vocab, horizon)[:horizon] + n[:, None] // powers


def random_logits(rng: jax.Array, vocab: int, horizon: int, scale: float = 1.0, dtype=jnp.float32):
    """Gaussian logits [R, V] with standard deviation `scale`."""
    return scale * jax.random.normal(rng, (num_prefixes(vocab, horizon), vocab), dtype=dtype)


def sequence_log_probs(logits_RxV, tokens_NxT):
    """log π(y_t | y_<t) per step [N, T] for token sequences, via the canonical row map."""
    vocab = logits_RxV.shape[-1]
    horizon = tokens_NxT.shape[-1]
    logp_RxV = jax.nn.log_softmax(logits_RxV, axis=-1)
    powers = vocab ** jnp.arange(horizon - 1, -1, -1)
    n = jnp.sum(tokens_NxT * powers, axis=-1)
    rows_NxT = sequence_rows(n, vocab, horizon)
    return logp_RxV[rows_NxT, tokens_NxT]


def sample_tabular(rng: jax.Array, logits_RxV, horizon: int, num: int):
    """Monte Carlo: `num` sequences [num, T] from a tabular policy, plus their prefix rows [num, T]."""
    vocab = logits_RxV.shape[-1]
    offsets = jnp.asarray(prefix_offsets(vocab, horizon))

    # SAMPLE ONE STEP: row = offset_t + value of the prefix so far
    def step(value_N, inputs):
        t, key = inputs
        rows_N = offsets[t] + value_N
        tok_N = jax.random.categorical(key, logits_RxV[rows_N], axis=-1).astype(value_N.dtype)
        return value_N * vocab + tok_N, (tok_N, rows_N)

    keys = jax.random.split(rng, horizon)
    _, (tok_TxN, rows_TxN) = jax.lax.scan(step, jnp.zeros((num,), jnp.int32), (jnp.arange(horizon), keys))
    return tok_TxN.T, rows_TxN.T


# ---------------------------------------------------------------------------------------------------------
# Tied parameterizations: logit rows shared between prefixes (tabular table = shared[tie]).
# ---------------------------------------------------------------------------------------------------------


def markov_tie(vocab: int, horizon: int, *, per_step: bool) -> np.ndarray:
    """Map each prefix row to a Markov parameter row.

    per_step=True:  P = T*V rows; the prefix of length t with last token a uses row t*V + a for t >= 1,
                    and the empty prefix (t = 0) uses the start row 0 (the layout of synthetic.markov).
    per_step=False: P = V + 1 rows, time-homogeneous: empty prefix -> row 0, last token a -> row 1 + a.
    """
    validate_sizes(vocab, horizon)
    tie = np.zeros(num_prefixes(vocab, horizon), dtype=np.int64)
    offsets = prefix_offsets(vocab, horizon)
    for t in range(1, horizon):
        last = np.arange(vocab**t) % vocab
        tie[offsets[t] : offsets[t + 1]] = (t * vocab + last) if per_step else (1 + last)
    return tie

"""opd.sampling: the on-policy invariant, exact top-p / top-k / temperature, stops, cache == no cache."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd import sampling
from opd.model import ModelConfig, Transformer, forward_logprobs
from opd.sampling import PAD_ID, Rollout, SamplingConfig, sample, select_tokens

CFG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, qk_norm=True)
B, P, N = 8, 6, 8


@pytest.fixture(scope="module")
def model():
    m = Transformer(CFG, rngs=nnx.Rngs(3))
    m.lm_head.kernel[...] = m.lm_head.kernel[...] * 20.0  # peaky: nuclei of a few tokens, early EOS
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, P + 1, B)
    mask = (np.arange(P)[None, :] >= P - lengths[:, None]).astype(np.int32)  # left padding
    tokens = rng.integers(1, CFG.vocab_size, (B, P)).astype(np.int32) * mask
    return jnp.asarray(tokens), jnp.asarray(mask)


def _nucleus(probs: np.ndarray, p: float) -> tuple[set[int], float]:
    """Exact nucleus (float64): smallest most-likely-first prefix with mass >= p; and how far the
    boundary sits from p (rows with a boundary within float32 rounding are ambiguous)."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, p)) + 1  # first index with cum >= p
    n = min(n, len(probs))
    margin = min(abs(cum[n - 1] - p), abs(cum[n - 2] - p) if n >= 2 else 1.0)
    return set(order[:n].tolist()), margin


def _count_in_nucleus(logits_BxV: np.ndarray, tokens_B: np.ndarray, p: float) -> int:
    """Assert each drawn token lies in its row's float64 nucleus; returns how many rows were checked
    (rows whose nucleus boundary is within float32 rounding of p are ambiguous and skipped)."""
    checked = 0
    for row, tok in zip(logits_BxV, tokens_B):
        q = np.exp(row - row.max())
        nucleus, margin = _nucleus(q / q.sum(), p)
        if margin < 1e-5:
            continue
        assert int(tok) in nucleus
        checked += 1
    return checked


SAMPLING = {
    "plain": SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=N),
    "topp_temp": SamplingConfig(temperature=0.7, top_p=0.8, max_new_tokens=N),
    "topk_topp_temp": SamplingConfig(temperature=1.3, top_p=0.9, top_k=5, max_new_tokens=N),
}


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_logprobs_match_forward_pass(model, prompts, name):
    """The on-policy invariant: recorded log-probs == the trainer's recomputation, to 1e-5."""
    cfg = SAMPLING[name]
    out = sample(model, *prompts, jax.random.key(1), cfg, eos_id=5)
    assert isinstance(out, Rollout)
    assert out.tokens_BxL.shape == (B, P + N) and out.logprobs_BxL.dtype == jnp.float32
    recomputed = nnx.jit(forward_logprobs)(model, out.tokens_BxL, out.attention_mask_BxL)
    resp = np.asarray(out.response_mask_BxL, bool)
    assert resp.sum() > 0
    np.testing.assert_allclose(np.asarray(out.logprobs_BxL)[resp], np.asarray(recomputed)[resp],
                               rtol=0, atol=1e-5)
    assert np.all(np.asarray(out.logprobs_BxL)[~resp] == 0.0)
    np.testing.assert_array_equal(out.response_len_B, resp.sum(1))
    np.testing.assert_array_equal(out.attention_mask_BxL[:, :P], prompts[1])
    np.testing.assert_array_equal(out.attention_mask_BxL[:, P:], out.response_mask_BxL[:, P:])


def test_rollout_tokens_stay_in_the_exact_nucleus(model, prompts):
    """Every token drawn with top-p (and temperature) lies in the nucleus of softmax(logits / T),
    recomputed independently in float64 from a full forward pass over the rollout."""
    cfg = SAMPLING["topp_temp"]
    tokens = jnp.tile(prompts[0], (4, 1))
    mask = jnp.tile(prompts[1], (4, 1))
    out = sample(model, tokens, mask, jax.random.key(2), cfg, eos_id=5)
    logits = nnx.jit(lambda m, t, a: m(t, attention_mask_BxT=a))(model, out.tokens_BxL, out.attention_mask_BxL)
    logits = np.asarray(logits, np.float64)
    resp = np.asarray(out.response_mask_BxL, bool)
    checked = 0
    for b, t in zip(*np.nonzero(resp)):
        z = logits[b, t - 1] / cfg.temperature
        probs = np.exp(z - z.max())
        nucleus, margin = _nucleus(probs / probs.sum(), cfg.top_p)
        if margin < 1e-5:
            continue
        assert int(out.tokens_BxL[b, t]) in nucleus, (b, t)
        checked += 1
    assert checked > 100


@pytest.fixture(scope="module")
def draw():
    return jax.jit(select_tokens, static_argnums=2)


def _frequencies(draw, probs, cfg, n=6000, seed=0):
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    toks = np.asarray(draw(logits, jax.random.key(seed), cfg))
    return np.bincount(toks, minlength=len(probs)) / n


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        # nucleus at p = 0.85 of [.5, .3, .15, .05] is {0, 1, 2} (mass 0.95), renormalized
        (SamplingConfig(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        # p below the top token's mass keeps only the top token
        (SamplingConfig(top_p=0.3), [1.0, 0.0, 0.0, 0.0]),
        (SamplingConfig(top_k=2), [0.625, 0.375, 0.0, 0.0]),
        # temperature 2: probs proportional to sqrt(p); then top-p 0.7 keeps {0, 1}
        (SamplingConfig(temperature=2.0), list(np.sqrt([.5, .3, .15, .05]) / np.sqrt([.5, .3, .15, .05]).sum())),
        (SamplingConfig(temperature=2.0, top_p=0.6), [0.5**.5 / (0.5**.5 + 0.3**.5), 0.3**.5 / (0.5**.5 + 0.3**.5),
                                                      0.0, 0.0]),
    ],
)
def test_selection_distribution_is_exact(draw, cfg, expected):
    n = 6000
    freq = _frequencies(draw, [0.5, 0.3, 0.15, 0.05], cfg, n=n)
    expected = np.asarray(expected)
    assert np.all(freq[expected == 0] == 0)  # never outside the support
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-12), (freq, expected)


def test_top_p_never_leaves_nucleus_on_random_rows(draw):
    """Many rows of random peaky logits; each drawn token is checked against its float64 nucleus."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (3000, CFG.vocab_size))
    cfg = SamplingConfig(top_p=0.7)
    toks = np.asarray(draw(jnp.asarray(logits, jnp.float32), jax.random.key(3), cfg))
    assert _count_in_nucleus(logits, toks, 0.7) > 2900


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=N)


def _never_emitted(model, prompts):
    """An id that greedy decoding of these prompts never emits, and that (all-truncated) greedy rollout."""
    for never in range(CFG.vocab_size - 1, 0, -1):
        base = sample(model, *prompts, jax.random.key(0), GREEDY, eos_id=never)
        if not np.any(np.asarray(base.tokens_BxL[:, P:]) == never):
            return never, base
    raise AssertionError("every id is emitted")


def test_eos_and_stop_ids_end_sequences(model, prompts):
    """Greedy rollouts are deterministic, so rerunning with a token seen mid-rollout as EOS (or as an
    extra stop id) must cut each sequence exactly at its first occurrence and PAD the rest."""
    never, base = _never_emitted(model, prompts)
    resp = np.asarray(base.tokens_BxL[:, P:])
    assert np.all(base.truncated_B) and np.all(base.response_len_B == N)
    stop = int(resp[0, 2])
    for kwargs in ({"eos_id": stop}, {"eos_id": never, "stop_ids": (stop,)}):
        out = sample(model, *prompts, jax.random.key(0), GREEDY, **kwargs)
        got = np.asarray(out.tokens_BxL[:, P:])
        for b in range(B):
            hits = np.nonzero(resp[b] == stop)[0]
            n = int(hits[0]) + 1 if len(hits) else N
            np.testing.assert_array_equal(got[b, :n], resp[b, :n])
            assert np.all(got[b, n:] == PAD_ID)
            assert int(out.response_len_B[b]) == n
            assert bool(out.truncated_B[b]) == (len(hits) == 0)
            np.testing.assert_array_equal(out.response_mask_BxL[b, P:], np.arange(N) < n)
        assert not out.truncated_B[0] and int(out.response_len_B[0]) <= 3


def test_greedy_with_cache_equals_greedy_without(model, prompts):
    """Reference decoder without a cache: full forward over a fixed buffer at every step."""
    _, out = _never_emitted(model, prompts)

    @jax.jit
    def next_token(buf, msk, t):
        logits = model(buf, attention_mask_BxT=msk)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), -1)

    buf = jnp.concatenate([prompts[0], jnp.zeros((B, N), jnp.int32)], 1)
    msk = jnp.concatenate([prompts[1], jnp.zeros((B, N), jnp.int32)], 1)
    for i in range(N):
        tok = next_token(buf, msk, P + i).astype(jnp.int32)
        buf, msk = buf.at[:, P + i].set(tok), msk.at[:, P + i].set(1)
    np.testing.assert_array_equal(out.tokens_BxL, buf)


def test_decode_windows_double_up_to_the_budget():
    assert sampling.decode_windows(599, 64) == [64, 128, 256, 512, 599]
    assert sampling.decode_windows(128, 64) == [64, 128]
    assert sampling.decode_windows(64, 64) == [64]
    assert sampling.decode_windows(40, 64) == [40]
    assert sampling.decode_windows(599, 0) == [599]


@pytest.mark.parametrize("first_window", [1, 3])
@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_decode_windows_change_no_draw(model, prompts, name, first_window):
    """Windows of 1, 2, 4, 8 (or 3, 6, 8) positions, the cache growing between them, draw what one window over
    the full cache draws, and the recorded log-probs still match the trainer's recomputation."""
    cfg = SAMPLING[name]
    key = jax.random.key(6)
    # The draws do not depend on the stop id until a row stops: make row 0's third token its EOS.
    eos = int(sample(model, *prompts, key, cfg, eos_id=5).tokens_BxL[0, P + 2])
    one = sample(model, *prompts, key, cfg, eos_id=eos)
    out = sample(model, *prompts, key, dataclasses.replace(cfg, first_window=first_window), eos_id=eos)
    assert int(out.response_len_B.min()) <= 3 < N  # rows stop at different steps; the others run on to N
    np.testing.assert_array_equal(out.tokens_BxL, one.tokens_BxL)
    np.testing.assert_array_equal(out.response_len_B, one.response_len_B)
    np.testing.assert_array_equal(out.truncated_B, one.truncated_B)
    np.testing.assert_allclose(out.logprobs_BxL, one.logprobs_BxL, rtol=0, atol=1e-6)
    recomputed = nnx.jit(forward_logprobs)(model, out.tokens_BxL, out.attention_mask_BxL)
    resp = np.asarray(out.response_mask_BxL, bool)
    np.testing.assert_allclose(np.asarray(out.logprobs_BxL)[resp], np.asarray(recomputed)[resp], rtol=0, atol=1e-5)


def test_no_retrace_and_reproducible(model, prompts):
    cfg = SAMPLING["topp_temp"]
    a = sample(model, *prompts, jax.random.key(4), cfg, eos_id=5)
    size = sampling._sample_jit._cache_size()
    other = (prompts[0].at[:, -1].set(7), prompts[1])
    b = sample(model, *other, jax.random.key(5), cfg, eos_id=6)
    c = sample(model, *prompts, jax.random.key(4), cfg, eos_id=5)
    assert sampling._sample_jit._cache_size() == size
    np.testing.assert_array_equal(a.tokens_BxL, c.tokens_BxL)
    assert b.tokens_BxL.shape == a.tokens_BxL.shape


def test_all_done_early_exit_keeps_shapes(model, prompts):
    """If every sequence stops on its first token the loop exits at once; the rest is PAD."""
    _, base = _never_emitted(model, prompts)
    first = np.asarray(base.tokens_BxL[:, P])
    out = sample(model, *prompts, jax.random.key(0), GREEDY, eos_id=int(first[0]),
                 stop_ids=tuple(int(t) for t in first[1:]))
    assert out.tokens_BxL.shape == (B, P + N)
    np.testing.assert_array_equal(out.response_len_B, np.ones(B))
    assert np.all(np.asarray(out.tokens_BxL[:, P + 1 :]) == PAD_ID) and not np.any(out.truncated_B)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
     ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"first_window": -1}, "first_window")],
)
def test_bad_sampling_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SamplingConfig(**kwargs)


def test_right_padded_prompt_rejected(model):
    tokens = jnp.array([[3, 4, 0]], jnp.int32)
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, tokens, (tokens > 0).astype(jnp.int32), jax.random.key(0), GREEDY, eos_id=1)




# --- the sort-free nucleus: keep-mask == the sort-based nucleus -------------------------------------------


def _sorted_nucleus_mask(probs: np.ndarray, probs32: np.ndarray, p: float) -> tuple[np.ndarray, float, bool]:
    """Float64 sort-based nucleus of one row of probabilities, as a mask over the vocabulary; the boundary
    margin (see `_nucleus`); and whether float32 ties widened it. The threshold form keeps every token tied
    with the least likely kept one, and the function under test sees float32 probabilities `probs32`, where
    two tokens whose float64 probabilities differ by less than float32 resolution tie: so the expected mask
    is {i : probs32_i >= min over the float64 prefix of probs32}, which is the prefix itself unless such a
    tie (or a float32 swap) sits at the boundary."""
    prefix, margin = _nucleus(probs, p)
    mask = probs32 >= min(probs32[i] for i in prefix)
    return mask, margin, int(mask.sum()) != len(prefix)


@pytest.fixture(scope="module")
def threshold_keep():
    return jax.jit(sampling.nucleus_threshold_keep, static_argnums=1)


def _check_keep_masks(threshold_keep, logits: np.ndarray, p: float) -> int:
    """Compare the sort-free keep-mask with the float64 sort-based nucleus on every row whose boundary is
    clear of float32 rounding (margin >= 1e-5, as above); returns how many rows were compared."""
    keep = np.asarray(threshold_keep(jnp.asarray(logits, jnp.float32), p))
    assert keep.shape == logits.shape and keep.dtype == np.bool_
    assert np.all(keep.sum(-1) >= 1)  # never empty
    if p >= 1.0:  # mass >= 1 needs every token (a float64 cumsum may round to 1 early, so no sort here)
        assert np.all(keep)
        return len(logits)
    probs32 = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    checked = widened = 0
    for row, k, q32 in zip(np.asarray(logits, np.float32).astype(np.float64), keep, probs32):
        probs = np.exp(row - row.max())
        mask, margin, tied = _sorted_nucleus_mask(probs / probs.sum(), q32, p)
        if margin < 1e-5:
            continue
        np.testing.assert_array_equal(k, mask)
        checked += 1
        widened += tied
    assert widened <= max(2, 0.01 * checked), widened  # float32 ties at the boundary are rare
    return checked


@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0, 40.0])  # flat ... peaked
def test_threshold_keep_equals_sorted_nucleus(threshold_keep, p, scale):
    """Many random rows (flat to very peaked, several widths); p tiny -> exactly the top-1 token,
    p = 1 -> every token."""
    rng = np.random.default_rng(int(p * 1e6) + int(scale * 10))
    checked = 0
    for V in (2, 7, 40, 1024):
        logits = rng.normal(0, scale, (300, V))
        checked += _check_keep_masks(threshold_keep, logits, p)
        if p == 1e-6:
            keep = np.asarray(threshold_keep(jnp.asarray(logits, jnp.float32), p))
            np.testing.assert_array_equal(keep, np.arange(V)[None, :] == np.argmax(logits, -1)[:, None])
        if p == 1.0:
            assert np.all(np.asarray(threshold_keep(jnp.asarray(logits, jnp.float32), p)))
    assert checked >= 0.9 * 4 * 300  # the rest have a boundary within float32 rounding of p


def test_threshold_keep_on_k_limited_rows(threshold_keep):
    """Rows already cut to their top k (-inf elsewhere, as top-k truncation leaves them): the nucleus lies
    within the k survivors and equals the sort-based one; -inf tokens are never kept unless p = 1."""
    rng = np.random.default_rng(7)
    V, k = 200, 9
    logits = rng.normal(0, 2.0, (500, V))
    kth = np.sort(logits, -1)[:, -k][:, None]
    cut = np.where(logits >= kth, logits, -np.inf)
    for p in (0.2, 0.6, 0.9, 0.999):
        keep = np.asarray(threshold_keep(jnp.asarray(cut, jnp.float32), p))
        assert not np.any(keep & np.isinf(cut))
        assert _check_keep_masks(threshold_keep, cut, p) >= 450


def test_threshold_keep_at_qwen_vocab_width(threshold_keep):
    """Full-size rows (V = 151,936, the Qwen2 vocabulary), LM-like (heavy head, long tail) and flat-ish."""
    rng = np.random.default_rng(11)
    V = 151_936
    peaked = rng.standard_t(3, (2, V)) * 2.0
    peaked[:, rng.integers(0, V, 20)] += 12.0  # a few dominant tokens
    rows = np.concatenate([peaked, rng.normal(0, 3.0, (2, V))])
    checked = 0
    for p in (0.5, 0.9, 0.95):
        checked += _check_keep_masks(threshold_keep, rows, p)
    assert checked >= 8  # of 12 (row, p) pairs; the rest have a boundary within 1e-5 of p


def test_select_tokens_without_sort_keeps_k_and_p(draw):
    """top-k then top-p through select_tokens: drawn tokens lie in the nucleus of the k survivors."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2.0, (3000, CFG.vocab_size))
    cfg = SamplingConfig(top_k=6, top_p=0.8)
    toks = np.asarray(draw(jnp.asarray(logits, jnp.float32), jax.random.key(9), cfg))
    checked = 0
    for row, tok in zip(logits, toks):
        top = np.argsort(-row, kind="stable")[:6]
        p = np.exp(row[top] - row[top].max())
        nucleus, margin = _nucleus(p / p.sum(), 0.8)
        if margin < 1e-5:
            continue
        assert int(tok) in {int(top[i]) for i in nucleus}
        checked += 1
    assert checked > 2900


def test_select_tokens_traces_no_sort():
    """Without top-k the top-p path must not sort the vocabulary nor select its top k: it draws by rejection
    from supersets of the nucleus."""
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    jaxpr = str(jax.make_jaxpr(lambda x, k: select_tokens(x, k, cfg))(jnp.zeros((2, 1024)), jax.random.key(0)))
    assert "sort[" not in jaxpr and "sort " not in jaxpr  # no `sort` primitive (argsort is one too)
    assert "top_k[" not in jaxpr and "while[" in jaxpr  # the rejection rounds


@pytest.mark.parametrize("p", [0.85, 0.99])
def test_top_p_fast_path_and_fallback_are_exact(draw, p):
    """V = 300: p = 0.85 keeps {0, 1, 2} of a heavy head; p = 0.99 needs the head plus 200 equal tail
    tokens (all kept: the threshold form keeps every token tied at τ*). Both must give exactly the
    renormalized nucleus."""
    head = np.array([0.5, 0.3, 0.15, 0.0])
    tail = np.full(296, 0.05 / 296)
    probs = np.concatenate([head[:3], tail])
    probs[3:203] = 0.0499 / 200  # 200 equal tokens: 0.95 + 0.0499 = 0.9999 of the mass ...
    probs[203:] = 0.0001 / 97  # ... and 97 tiny ones
    n = 8000
    freq = _frequencies(draw, probs, SamplingConfig(top_p=p), n=n)
    if p == 0.85:
        expected = np.zeros_like(probs)
        expected[:3] = probs[:3] / probs[:3].sum()
    else:  # 0.95 + k * 0.0499/200 >= 0.99 first at k = 161; all 200 tied tokens are kept (threshold form)
        expected = np.where(np.arange(len(probs)) < 203, probs, 0.0)
        expected /= expected.sum()
    assert np.all(freq[expected == 0] == 0)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-12), (freq[:5], expected[:5])


def test_top_p_rejection_rounds_are_exact(draw):
    """A nucleus of low mass (0.10 at p = 0.09) above two tiers of less likely tokens: most first proposals
    miss, so rows go on to the rounds, whose floor rises past the low tier first and still leaves the middle
    tier to reject; the draws must be exactly the renormalized nucleus {0, 1, 2} (tokens 1 and 2 tie)."""
    probs = np.concatenate([[0.04, 0.03, 0.03], np.full(10, 0.02), np.full(700, 0.7 / 700)])
    n = 6000
    freq = _frequencies(draw, probs, SamplingConfig(top_p=0.09), n=n)
    expected = np.zeros_like(probs)
    expected[:3] = [0.4, 0.3, 0.3]
    assert np.all(freq[expected == 0] == 0)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-12), (freq[:4], expected[:4])


def test_top_p_rows_of_mixed_width_stay_in_nucleus(draw):
    """V = 1024: batches of peaked rows (fast path) and batches mixing flat rows (bisection); every drawn
    token is checked against its float64 nucleus."""
    rng = np.random.default_rng(2)
    for scale in (8.0, 0.5):
        logits = rng.normal(0, scale, (1000, 1024))
        toks = np.asarray(draw(jnp.asarray(logits, jnp.float32), jax.random.key(4), SamplingConfig(top_p=0.7)))
        assert _count_in_nucleus(logits, toks, 0.7) > 900


def _while_bodies(hlo: str) -> dict[str, list[str]]:
    """The instructions of every while loop's body in an optimized HLO module's text, by computation name."""
    names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    bodies, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1) if head.group(1) in names else None
            if current:
                bodies[current] = []
        elif current and line.strip() == "}":
            current = None
        elif current:
            bodies[current].append(line)
    return bodies


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_a_decode_step_copies_no_cache_buffer(kv_heads, prompts):
    """A decode step writes one slot of each layer's k/v buffers in place: no instruction in the compiled
    decode loops copies a whole cache buffer. With one kv head kept as an axis ([B, 1, S, E] buffers), XLA's
    CPU compiler copied every buffer three to four times per step (opd/model/cache.py), which this catches."""
    cfg = CFG.replace(num_heads=2, num_kv_heads=kv_heads)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    scfg = SamplingConfig(max_new_tokens=N, first_window=4)
    stops = jnp.full((8,), 1, jnp.int32)
    hlo = sampling._sample_jit.lower(graphdef, params, *prompts, jax.random.key(0), stops,
                                     cfg=scfg).compile().as_text()
    bodies = _while_bodies(hlo)
    E = cfg.resolved_head_dim
    slots = "|".join(str(P + end) for end in sampling.decode_windows(N, scfg.first_window))  # one size per window
    # the cache's buffers, [B, K, S, E], or [B, S, E] for one kv head (and the [B, 1, S, E] this test guards against)
    cache_shape = re.compile(rf"f32\[{B},({kv_heads},)?({slots}),{E}\]")
    decode = {name: lines for name, lines in bodies.items()
              if any("dynamic-update-slice" in ln and cache_shape.search(ln) for ln in lines)}
    assert decode, "found no decode loop writing the cache in the compiled sampler"
    copies = [ln.strip()[:120] for lines in decode.values() for ln in lines
              if " copy(" in ln and cache_shape.search(ln.split("copy(")[0])]
    assert not copies, f"{len(copies)} whole-buffer copies in the decode loops, e.g. {copies[:2]}"

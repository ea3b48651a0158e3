"""Chunked large-vocabulary objectives equal the unchunked ones (values and gradients) and use less memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd import chunked, losses

TOL = dict(rtol=1e-5, atol=1e-5)
LEAD, D, V, K = (3, 10), 16, 50, 6  # 30 positions: not a multiple of the chunk sizes used below


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(*LEAD, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D) * 3, jnp.float32)
    teacher_logits = rng.normal(size=(*LEAD, V)) * 2
    logq = teacher_logits - np.log(np.exp(teacher_logits).sum(-1, keepdims=True))
    ids = np.argsort(-logq, axis=-1)[..., :K]
    return h, w, jnp.asarray(ids, jnp.int32), jnp.asarray(np.take_along_axis(logq, ids, -1), jnp.float32)


def _value_and_grads(f, h, w):
    mask = jnp.asarray(np.random.default_rng(1).random(LEAD) > 0.3, jnp.float32)

    def loss(h, w):
        values = f(h, w)
        return losses.aggregate(values, mask, "token_mean"), values

    (l, values), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    return l, values, grads


def _topk(fn):
    """A top-K objective of opd.losses, chunked over the hidden states (ids and log-probs as payload)."""
    return lambda h, w, ids, lq, chunk_size: chunked.chunked_map(fn, h, w, ids, lq, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "fn,chunk_size",
    [
        (losses.topk_reverse_kl, 1),
        (losses.topk_reverse_kl, 7),  # 10 = 7 + 3: padded last chunk
        (losses.topk_reverse_kl, 10),  # exactly one chunk
        (losses.topk_reverse_kl, 64),  # chunk larger than the position axis
        (functools.partial(losses.topk_reverse_kl, renormalize=False), 7),
        (losses.topk_forward_kl, 3),
        (losses.topk_forward_kl, 4),
        (losses.topk_reverse_kl_with_tail, 3),
        (losses.topk_reverse_kl_with_tail, 4),
    ],
)
def test_topk_chunked_matches_unchunked(fn, chunk_size):
    h, w, ids, lq = _inputs()

    def ref(h, w):  # the objective from opd.losses on the full logits, no chunking anywhere
        return fn(h @ w, ids, lq)

    def chk(h, w):
        return _topk(fn)(h, w, ids, lq, chunk_size)

    l0, v0, g0 = _value_and_grads(ref, h, w)
    l1, v1, g1 = jax.jit(lambda h, w: _value_and_grads(chk, h, w))(h, w)
    assert v1.shape == LEAD and v1.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v1)))
    np.testing.assert_allclose(v1, v0, **TOL)
    np.testing.assert_allclose(l1, l0, **TOL)
    for a, b in zip(g1, g0):
        assert float(jnp.abs(b).max()) > 0  # the gradient is not trivially zero
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("fn", [losses.full_reverse_kl, functools.partial(losses.generalized_jsd, beta=0.3)])
def test_full_vocab_chunked_matches_unchunked(fn):
    h, w, _, _ = _inputs()
    rng = np.random.default_rng(5)
    th = jnp.asarray(rng.normal(size=(*LEAD, 12)), jnp.float32)
    tw = jnp.asarray(rng.normal(size=(12, V)), jnp.float32)

    def chk(h, w, th=th, chunk_size=4):
        return chunked.chunked_map(fn, h, w, chunk_size=chunk_size, extra_heads=((th, tw),))

    l0, v0, g0 = _value_and_grads(lambda h, w: fn(h @ w, th @ tw), h, w)
    l1, v1, g1 = _value_and_grads(chk, h, w)
    np.testing.assert_allclose(v1, v0, **TOL)
    np.testing.assert_allclose(l1, l0, **TOL)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, **TOL)
    # The teacher head's logits are recomputed per chunk too, and differentiable like the student's: the
    # trainer stops the teacher's gradient itself (opd/objectives.py), not the chunking.
    gt = jax.grad(lambda th: chk(h, w, th).sum())(th)
    gt_ref = jax.grad(lambda th: fn(h @ w, th @ tw).sum())(th)
    np.testing.assert_allclose(gt, gt_ref, **TOL)


def test_batch_axes_stay_whole_in_every_chunk():
    """Chunks run along the last leading axis; each chunk's logits span the whole batch axis."""
    h, w, _, _ = _inputs()
    shapes = []

    def fn(logits):
        shapes.append(logits.shape)
        return logits.sum(-1)

    out = chunked.chunked_map(fn, h, w, chunk_size=4)
    assert shapes == [(LEAD[0], 4, V)] and out.shape == LEAD
    np.testing.assert_allclose(out, (h @ w).sum(-1), **TOL)


def test_token_logprobs_and_entropy_chunked():
    h, w, _, _ = _inputs()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, LEAD), jnp.int32)
    logits = np.asarray(h @ w, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lp_ref = np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
    ent_ref = -(np.exp(logp) * logp).sum(-1)
    lp, ent = chunked.chunked_token_logprobs(h, w, tokens, chunk_size=7)
    np.testing.assert_allclose(lp, lp_ref, **TOL)
    np.testing.assert_allclose(ent, ent_ref, **TOL)

    def f(cs):
        def loss(h, w):
            lp, ent = chunked.chunked_token_logprobs(h, w, tokens, chunk_size=cs)
            return jnp.sum(lp * jnp.arange(lp.size).reshape(lp.shape)) + 0.1 * jnp.sum(ent)

        return jax.grad(loss, argnums=(0, 1))(h, w)

    for a, b in zip(f(7), f(None)):
        np.testing.assert_allclose(a, b, **TOL)


def test_bf16_inputs_give_float32_values():
    h, w, ids, lq = _inputs()
    v = _topk(losses.topk_reverse_kl)(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), ids, lq, 8)
    assert v.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(v)))


def test_flat_and_batched_layouts_agree():
    h, w, ids, lq = _inputs()
    v = _topk(losses.topk_reverse_kl)(h, w, ids, lq, 4)
    vf = _topk(losses.topk_reverse_kl)(h.reshape(-1, D), w, ids.reshape(-1, K), lq.reshape(-1, K), 4)
    np.testing.assert_array_equal(np.asarray(v).reshape(-1), np.asarray(vf))


def test_bad_arguments_raise_one_clear_error():
    h, w, ids, lq = _inputs()
    f = losses.topk_reverse_kl
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size: expected null or a positive integer"):
            chunked.chunked_map(f, h, w, ids, lq, chunk_size=bad)
    with pytest.raises(ValueError, match="hidden size"):
        chunked.chunked_map(f, h[..., :5], w, ids, lq)
    with pytest.raises(ValueError, match="at least one position axis"):
        chunked.chunked_map(f, h[0, 0], w, ids, lq)
    with pytest.raises(ValueError, match=r"payload.*leading axes"):
        chunked.chunked_map(f, h, w, ids[:2], lq[:2])
    with pytest.raises(ValueError, match=r"extra_heads.*leading axes"):
        chunked.chunked_map(losses.full_reverse_kl, h, w, extra_heads=((h[:2], w),))


def test_resolve_chunk_size_policy():
    big, small = chunked.CHUNK_ABOVE_VOCAB + 1, chunked.CHUNK_ABOVE_VOCAB
    assert chunked.resolve_chunk_size(None, big) == chunked.DEFAULT_CHUNK_SIZE
    assert chunked.resolve_chunk_size(None, small) is None
    assert chunked.resolve_chunk_size(0, big) is None  # explicitly off
    assert chunked.resolve_chunk_size(64, small) == 64  # explicitly on, whatever the vocabulary
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(ValueError, match="chunk_size: expected null"):
            chunked.resolve_chunk_size(bad, big)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked.resolve_chunk_size(None, 0)


def _temp_bytes(chunk_size, n=2048, d=64, v=4096, k=8):
    def loss(h, w, ids, lq):
        return _topk(losses.topk_reverse_kl)(h, w, ids, lq, chunk_size).mean()

    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunking_reduces_compiled_temporary_memory():
    # [2048, 4096] float32 logits are 32 MiB; chunks of 128 rows are 2 MiB each.
    full, chunk = _temp_bytes(None), _temp_bytes(128)
    assert full >= 2048 * 4096 * 4  # the unchunked gradient holds at least one [N, V] float32 array
    assert chunk * 4 <= full, (chunk, full)


def test_chunked_model_logprobs_match_forward_logprobs():
    from flax import nnx

    from opd.model import ModelConfig, Transformer, forward_logprobs

    cfg = ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(1, 40, (3, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [2], [4]]), jnp.int32)  # left padding
    lp, ent = chunked.chunked_model_logprobs(model, tokens, mask, chunk_size=5)
    np.testing.assert_allclose(lp, forward_logprobs(model, tokens, mask), **TOL)
    assert ent.shape == (3, 9) and float(ent[0, 0]) == 0.0 and float(ent[0, 1]) > 0

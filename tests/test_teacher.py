"""opd.teacher: payload shapes, agreement with a full log-softmax, chunking, frozen, bad k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd.model import ModelConfig, Transformer, forward_logprobs
from opd.teacher import TeacherPayload, score

CFG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=64)


@pytest.fixture(scope="module")
def teacher():
    model = Transformer(CFG, rngs=nnx.Rngs(7))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 10.0  # peaky, so top-K is meaningful
    return model


def _batch():
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, CFG.vocab_size, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[1, :3].set(0).at[2, 7:].set(0)
    return tokens * mask, mask


def test_payload_shapes_and_full_logsoftmax_agreement(teacher):
    tokens, mask = _batch()
    K = 4
    out = score(teacher, tokens, mask, K)
    assert isinstance(out, TeacherPayload)
    assert out.topk_ids_BxLxK.shape == (3, 9, K) and out.topk_ids_BxLxK.dtype == jnp.int32
    assert out.topk_logprobs_BxLxK.shape == (3, 9, K) and out.topk_logprobs_BxLxK.dtype == jnp.float32
    assert out.sampled_logprobs_BxL.shape == (3, 9)

    logits = nnx.jit(lambda m, t, a: m(t, attention_mask_BxT=a))(teacher, tokens, mask)
    full = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [B, L, V] reference
    ids, lps = np.asarray(out.topk_ids_BxLxK), np.asarray(out.topk_logprobs_BxLxK)
    assert np.all(ids[:, 0] == 0) and np.all(lps[:, 0] == 0) and np.all(out.sampled_logprobs_BxL[:, 0] == 0)
    for b in range(3):
        for t in range(1, 9):
            row = full[b, t - 1]
            np.testing.assert_allclose(lps[b, t], row[ids[b, t]], rtol=0, atol=1e-5)  # a gather of the row
            np.testing.assert_allclose(lps[b, t], np.sort(row)[::-1][:K], rtol=0, atol=1e-5)  # the top K
            assert np.all(np.diff(lps[b, t]) <= 0)
    # Sampled-token log-probs equal the student-side recomputation of the same model.
    np.testing.assert_allclose(out.sampled_logprobs_BxL, nnx.jit(forward_logprobs)(teacher, tokens, mask), atol=1e-5)


def test_chunked_equals_unchunked(teacher):
    tokens, mask = _batch()
    ref = score(teacher, tokens, mask, 4)
    got = score(teacher, tokens, mask, 4, chunk_size=3)  # 8 scored positions -> 3 chunks, one padded
    np.testing.assert_array_equal(got.topk_ids_BxLxK, ref.topk_ids_BxLxK)
    np.testing.assert_allclose(got.topk_logprobs_BxLxK, ref.topk_logprobs_BxLxK, atol=1e-6)
    np.testing.assert_allclose(got.sampled_logprobs_BxL, ref.sampled_logprobs_BxL, atol=1e-6)


def test_teacher_is_frozen(teacher):
    """Differentiating through scoring gives exactly zero gradient for the teacher's parameters."""
    tokens, mask = _batch()
    graphdef, params = nnx.split(teacher)

    def f(p):
        out = score(nnx.merge(graphdef, p), tokens, mask, 4)
        return out.topk_logprobs_BxLxK.sum() + out.sampled_logprobs_BxL.sum()

    grads = jax.grad(f)(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("k", [0, -1, CFG.vocab_size + 1, 2.0])
def test_bad_k_raises(teacher, k):
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=r"k: expected an integer in \[1, vocab_size=40\]"):
        score(teacher, tokens, mask, k)


def test_k_equals_vocab_is_allowed(teacher):
    tokens, mask = _batch()
    out = score(teacher, tokens, mask, CFG.vocab_size)
    np.testing.assert_allclose(jnp.exp(out.topk_logprobs_BxLxK[:, 1:]).sum(-1), 1.0, atol=1e-5)


def test_mesh_placement_gives_the_same_payload(teacher):
    """mesh=None is the one-device mesh: the same program and values as passing that mesh explicitly."""
    from opd import sharding

    tokens, mask = _batch()
    ref = score(teacher, tokens, mask, 4, chunk_size=3)
    got = score(teacher, tokens, mask, 4, chunk_size=3, mesh=sharding.make_mesh(1, 1, 1))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_batch_not_divisible_over_the_mesh_is_refused(teacher):
    from opd import sharding

    # check_batch_divisible reads only the mesh's shape, so a mesh over one repeated device is enough here.
    devices = np.asarray(jax.devices()[:1] * 4).reshape(2, 2, 1)
    mesh = jax.sharding.Mesh(devices, sharding.AXES)
    tokens, mask = _batch()  # B = 3
    with pytest.raises(ValueError, match=r"tokens_BxL batch: 3 rows must be divisible by data\*fsdp=4"):
        score(teacher, tokens, mask, 4, mesh=mesh)


def test_bad_chunk_size_raises(teacher):
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="chunk_size: expected null or a positive integer"):
        score(teacher, tokens, mask, 4, chunk_size=0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_a_teacher_padded_past_the_student_is_scored_over_the_students_ids(teacher, chunk_size):
    """vocab_size=V: top-K ids and every log-prob are those of the log-softmax over the first V logits (the
    teacher's padded rows are no id the student can emit); here the teacher is `teacher` with 24 ids beyond V."""
    tokens, mask = _batch()
    V = CFG.vocab_size - 24
    out = score(teacher, tokens * (tokens < V), mask, 4, vocab_size=V, chunk_size=chunk_size)
    logits = nnx.jit(lambda m, t, a: m(t, attention_mask_BxT=a))(teacher, tokens * (tokens < V), mask)
    over_v = np.asarray(jax.nn.log_softmax(logits[..., :V], axis=-1))
    full = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ids, lps = np.asarray(out.topk_ids_BxLxK)[:, 1:], np.asarray(out.topk_logprobs_BxLxK)[:, 1:]
    assert ids.max() < V
    np.testing.assert_allclose(lps, np.take_along_axis(over_v[:, :-1], ids, -1), atol=1e-5)
    np.testing.assert_allclose(lps, -np.sort(-over_v[:, :-1], -1)[..., :4], atol=1e-5)
    target = np.asarray(tokens * (tokens < V))[:, 1:, None]
    sampled = np.take_along_axis(over_v[:, :-1], target, -1)[..., 0] * np.asarray(mask)[:, 1:]
    np.testing.assert_allclose(np.asarray(out.sampled_logprobs_BxL)[:, 1:], sampled, atol=1e-5)
    # the padded rows hold mass here (a random head), so renormalizing is not a no-op
    assert np.abs(over_v - full[..., :V]).max() > 0.1


@pytest.mark.parametrize("vocab_size", [0, CFG.vocab_size + 1, 2.0])
def test_vocab_size_past_the_teachers_is_refused(teacher, vocab_size):
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=r"vocab_size: expected an integer in \[1, the teacher's vocab_size=40\]"):
        score(teacher, tokens, mask, 1, vocab_size=vocab_size)

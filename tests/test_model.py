"""opd.model: shapes of every variant, causality, left-padding invariance, cache == full pass, log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd.model import KVCache, ModelConfig, Transformer, forward_logprobs

TINY = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, max_seq_len=64)

VARIANTS = {
    "gqa": {},
    "mha": {"num_kv_heads": 4},
    "mqa": {"num_kv_heads": 1},
    "tied": {"tie_embeddings": True},
    "qwen2_bias": {"attention_bias": True, "rope_theta": 1e6, "family": "qwen2"},
    "qwen3_qknorm_headdim": {"qk_norm": True, "head_dim": 16, "family": "qwen3", "tie_embeddings": True},
    "headdim_small": {"head_dim": 4},
}


@nnx.jit
def _fwd(model, tokens_BxT, mask_BxT=None):
    """Jitted full pass (one compile per shape instead of one per eager op: keeps the suite fast)."""
    return model(tokens_BxT, attention_mask_BxT=mask_BxT)


@nnx.jit
def _fwd_h(model, tokens_BxT):
    return model(tokens_BxT), model.hidden_states(tokens_BxT), model.lm_head_weight()


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _perturb_norms(model: Transformer, seed: int = 1) -> None:
    """RMSNorm weights start at one; randomize them so tests exercise them (and biases)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        del path
        if isinstance(var, nnx.Param) and var[...].ndim == 1:
            var[...] = var[...] + jnp.asarray(rng.normal(0, 0.3, var[...].shape), var[...].dtype)


def _tokens(B: int, T: int, seed: int = 0, V: int = TINY.vocab_size) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, (B, T)), jnp.int32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_build_and_run(name):
    cfg = TINY.replace(**VARIANTS[name])
    model = _model(cfg)
    tokens = _tokens(2, 7)
    logits, h, w = _fwd_h(model, tokens)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert hasattr(model, "lm_head") != cfg.tie_embeddings
    assert w.shape == (cfg.hidden_size, cfg.vocab_size)
    assert h.shape == (2, 7, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(h) @ np.asarray(w), logits, rtol=1e-5, atol=1e-5)
    E = cfg.resolved_head_dim
    attn = model.layers[0].self_attn
    assert attn.q_proj.kernel.shape == (cfg.hidden_size, cfg.num_heads * E)
    assert attn.k_proj.kernel.shape == (cfg.hidden_size, cfg.num_kv_heads * E)
    assert (attn.q_proj.bias is not None) == cfg.attention_bias
    assert hasattr(attn, "q_norm") == cfg.qk_norm


def test_hf_submodule_names():
    model = _model(TINY.replace(qk_norm=True, attention_bias=True))
    paths = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for expected in ["embed_tokens.embedding", "norm.weight", "lm_head.kernel",
                     "layers.1.input_layernorm.weight", "layers.1.post_attention_layernorm.weight",
                     "layers.0.self_attn.q_proj.kernel", "layers.0.self_attn.q_proj.bias",
                     "layers.0.self_attn.k_proj.bias", "layers.0.self_attn.v_proj.kernel",
                     "layers.0.self_attn.o_proj.kernel", "layers.0.self_attn.q_norm.weight",
                     "layers.0.self_attn.k_norm.weight", "layers.0.mlp.gate_proj.kernel",
                     "layers.0.mlp.up_proj.kernel", "layers.0.mlp.down_proj.kernel"]:
        assert expected in paths, (expected, sorted(paths))
    assert "layers.0.self_attn.o_proj.bias" not in paths


def test_config_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        TINY.replace(dtype="float8")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**TINY.to_dict(), "n_layer": 2})
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.parametrize("name", ["gqa", "qwen3_qknorm_headdim"])
def test_causality_gradient_is_exactly_zero(name):
    """d logits[:, :t+1] / d embeddings[:, t+1:] == 0 exactly, and nonzero for earlier embeddings."""
    cfg = TINY.replace(**VARIANTS[name])
    model = _model(cfg)
    _perturb_norms(model)
    tokens = _tokens(2, 8)
    emb = model.embed_tokens(tokens)
    t = 4

    def early_logits_sum(emb_BxTxD):
        logits = model(tokens, inputs_embeds_BxTxD=emb_BxTxD)
        return jnp.sum(jnp.sin(logits[:, : t + 1]))

    g = np.asarray(jax.jit(jax.grad(early_logits_sum))(emb))
    assert np.all(g[:, t + 1 :] == 0.0)
    assert np.all(np.abs(g[:, : t + 1]).sum(-1) > 0)


def test_left_padding_does_not_change_real_logits():
    model = _model(TINY.replace(attention_bias=True, qk_norm=True))
    _perturb_norms(model)
    seq = _tokens(1, 6, seed=3)
    ref = _fwd(model, seq)[0]
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), seq], axis=1)
    other = _tokens(1, 9, seed=4)
    batch = jnp.concatenate([padded, other], axis=0)
    mask = jnp.concatenate([jnp.concatenate([jnp.zeros((1, pad)), jnp.ones((1, 6))], 1), jnp.ones((1, 9))], 0)
    mask = mask.astype(jnp.int32)
    out = _fwd(model, batch, mask)
    np.testing.assert_allclose(out[0, pad:], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], _fwd(model, other, jnp.ones_like(other))[0], rtol=1e-5, atol=1e-5)
    # Changing what sits in the padding changes nothing.
    junk = batch.at[0, :pad].set(jnp.array([5, 6, 7]))
    np.testing.assert_allclose(_fwd(model, junk, mask)[0, pad:], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "qwen3_qknorm_headdim", "tied"])
def test_cache_decoding_equals_full_forward(name):
    """Prefill a left-padded prompt, decode token by token (one sequence stops feeding real tokens)."""
    cfg = TINY.replace(**VARIANTS[name])
    model = _model(cfg)
    _perturb_norms(model)
    B, P, N = 3, 5, 6
    prompt = _tokens(B, P, seed=5)
    prompt_mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], jnp.int32)
    prompt = prompt * prompt_mask
    gen = _tokens(B, N, seed=6)
    gen_mask = jnp.ones((B, N), jnp.int32).at[1, 3:].set(0)  # sequence 1 "stopped" after 3 tokens
    gen = gen * gen_mask
    full_tokens = jnp.concatenate([prompt, gen], 1)
    full_mask = jnp.concatenate([prompt_mask, gen_mask], 1)
    ref = _fwd(model, full_tokens, full_mask)

    cache = KVCache.create(cfg, B, P + N + 2)  # spare slots must be ignored
    step = nnx.jit(lambda m, tok, msk, c: m(tok, attention_mask_BxT=msk, cache=c))
    logits, cache = step(model, prompt, prompt_mask, cache)
    got = [logits]
    for i in range(N):
        logits, cache = step(model, gen[:, i : i + 1], gen_mask[:, i : i + 1], cache)
        got.append(logits)
    got = jnp.concatenate(got, 1)
    valid = np.asarray(full_mask, bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == P + N
    np.testing.assert_array_equal(cache.length_B, full_mask.sum(1))


def test_a_grown_cache_keeps_its_slots_and_adds_empty_ones():
    """The sampler grows the cache between decode windows: what was written stays, the new slots are invalid."""
    model = _model()
    prompt = _tokens(2, 4, seed=7)
    mask = jnp.array([[1, 1, 1, 1], [0, 1, 1, 1]], jnp.int32)
    _, cache = model(prompt * mask, attention_mask_BxT=mask, cache=KVCache.create(TINY, 2, 5))
    grown = cache.grow(9)
    assert grown.max_len == 9 and cache.grow(5) is cache
    for small, big in zip(cache.k_by_layer + cache.v_by_layer, grown.k_by_layer + grown.v_by_layer):
        np.testing.assert_array_equal(big[..., :5, :], small)
        assert not np.any(np.asarray(big[..., 5:, :]))
    np.testing.assert_array_equal(grown.valid_BxS[:, :5], cache.valid_BxS)
    assert not np.any(np.asarray(grown.valid_BxS[:, 5:]))
    assert int(grown.index) == 4 and np.array_equal(grown.length_B, [4, 3])
    with pytest.raises(ValueError, match="max_len"):
        cache.grow(4)


def test_forward_logprobs_target_aligned():
    model = _model()
    tokens = _tokens(2, 7)
    mask = jnp.ones((2, 7), jnp.int32).at[1, :2].set(0)
    lp = forward_logprobs(model, tokens, mask)
    logits = model(tokens, attention_mask_BxT=mask)
    logits = np.asarray(logits, np.float64)
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # float64 reference log-softmax
    lp_np, tokens_np, mask_np = np.asarray(lp), np.asarray(tokens), np.asarray(mask)
    for b in range(2):
        assert lp_np[b, 0] == 0.0
        for t in range(1, 7):
            expect = full[b, t - 1, tokens_np[b, t]] if mask_np[b, t] else 0.0
            assert abs(lp_np[b, t] - expect) < 1e-5
    assert lp.dtype == jnp.float32 and bool(jnp.all(lp <= 0))


@pytest.mark.parametrize("tied", [False, True])
def test_logit_scale_multiplies_every_path_to_the_logits(tied):
    """The same weights under logit_scale 3: the full pass and the head weight (which the chunked and sharded
    objectives read) are 3x those of scale 1, and the hidden states are untouched."""
    base = TINY.replace(tie_embeddings=tied)
    tokens = _tokens(2, 6)
    logits1, h1, w1 = _fwd_h(_model(base), tokens)
    logits3, h3, w3 = _fwd_h(_model(base.replace(logit_scale=3.0)), tokens)
    np.testing.assert_array_equal(np.asarray(h3), np.asarray(h1))
    np.testing.assert_allclose(np.asarray(w3), 3.0 * np.asarray(w1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits3), 3.0 * np.asarray(logits1), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(logits1).max()) > 0.0
    np.testing.assert_allclose(np.asarray(logits3), np.asarray(h3 @ w3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, True, "2"])
def test_logit_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"model\.logit_scale: expected a positive number"):
        TINY.replace(logit_scale=bad)


def test_a_neutral_logit_scale_leaves_the_dict_that_cache_keys_hash():
    assert "logit_scale" not in TINY.to_dict()  # keys of models trained before the field existed hold
    scaled = TINY.replace(logit_scale=2.0)
    assert scaled.to_dict()["logit_scale"] == 2.0
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled and ModelConfig.from_dict(TINY.to_dict()) == TINY


def test_bfloat16_runs():
    cfg = TINY.replace(dtype="bfloat16")
    model = _model(cfg)
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    logits = _fwd(model, _tokens(2, 5))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


_CACHED_FORWARD = """
import sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from flax import nnx
from opd import compile_cache
from opd.model import ModelConfig, Transformer
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
compile_cache.enable(sys.argv[1])
cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
model = Transformer(cfg, rngs=nnx.Rngs(0))
nnx.jit(lambda m, t: m(t))(model, jnp.ones((2, 5), jnp.int32)).block_until_ready()
print("HITS", len(hits))
"""


@pytest.mark.slow  # two fresh Python processes importing jax
def test_compile_cache_reuses_programs_across_processes(tmp_path):
    """A second process running the same program reads it from the persistent cache instead of compiling."""
    import subprocess
    import sys

    def run() -> int:
        out = subprocess.run([sys.executable, "-c", _CACHED_FORWARD, str(tmp_path / "xla")], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split("HITS")[-1])

    assert run() == 0 and any((tmp_path / "xla").iterdir())
    assert run() >= 1


@pytest.mark.parametrize(("which", "kwargs", "key"), [("empty", {}, "path"), ("file", {}, "path"),
                                                  ("new", {"min_compile_time_s": -1.0}, "min_compile_time_s")])
def test_compile_cache_bad_arguments(tmp_path, which, kwargs, key):
    """Checked before the global configuration changes."""
    from opd import compile_cache

    (tmp_path / "file").write_text("")
    path = {"empty": "", "file": str(tmp_path / "file"), "new": str(tmp_path / "new")}[which]
    with pytest.raises(ValueError, match=key):
        compile_cache.enable(path, **kwargs)
    assert jax.config.jax_compilation_cache_dir in (None, "")

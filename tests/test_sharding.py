"""Sharded OPD update on 8 simulated CPU devices == the same update on one device.

XLA_FLAGS must be set before JAX initializes its backend, so the multi-device run happens in a subprocess
(this file run as a script) with `--xla_force_host_platform_device_count=8`. That process runs the same
jitted update (LSM loss via opd.chunked/opd.losses, optax AdamW) on a one-device mesh and on 8-device
meshes, and writes losses and updated parameters; the test compares them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from opd import sharding

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"1dev": (1, 1, 1), "dp2_fsdp2_tp2": (2, 2, 2), "fsdp8": (1, 8, 1)}  # (data, fsdp, tensor)


# ---------------------------------------------------------------------------------------------------------
# Worker: runs in the 8-device subprocess.
# ---------------------------------------------------------------------------------------------------------


def _worker(out_path: str) -> None:
    import optax
    from flax import nnx

    from opd import chunked, losses, teacher
    from opd.model import ModelConfig, Transformer
    from opd.sampling import SamplingConfig, sample

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_numpy_rank_promotion", "raise")  # style.md E8
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, attention_bias=True, family="qwen2")
    B, L, K = 8, 12, 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (B, L)).astype(np.int32)
    attn = np.ones((B, L), np.int32)
    for b in range(B):  # left padding of varying length
        attn[b, : b % 3] = 0
        tokens[b, : b % 3] = 0
    resp = np.zeros((B, L), np.float32)
    resp[:, 6:] = 1.0
    teacher_logits = rng.normal(size=(B, L, cfg.vocab_size)) * 2
    logq = teacher_logits - np.log(np.exp(teacher_logits).sum(-1, keepdims=True))
    ids = np.argsort(-logq, -1)[..., :K].astype(np.int32)
    batch = {
        "tokens": tokens, "attention_mask": attn, "response_mask": resp,
        "topk_ids": ids, "topk_logprobs": np.take_along_axis(logq, ids, -1).astype(np.float32),
    }

    def run(mesh_shape):
        mesh = sharding.make_mesh(*mesh_shape)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        state_sh = sharding.state_shardings(state, mesh)  # params + AdamW moments: rules by path
        batch_sh = sharding.batch_shardings(batch, mesh)  # batch axis over ("data", "fsdp")
        state = jax.device_put(state, state_sh)

        def step(state, batch):
            model, opt = nnx.merge(graphdef, state)

            def loss_fn(model):
                h = model.hidden_states(batch["tokens"], attention_mask_BxT=batch["attention_mask"])
                # Target-aligned: the hidden state at t - 1 scores token t.
                values = chunked.chunked_topk_objective(
                    h[:, :-1], model.lm_head_weight(), batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:],
                    chunk_size=16,
                )
                return losses.aggregate(values, batch["response_mask"][:, 1:], "token_mean")

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return nnx.state((model, opt)), loss

        update = jax.jit(step, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
        placed = sharding.shard_batch(batch, mesh)
        losses_seen = []
        for _ in range(2):
            state, loss = update(state, placed)
            losses_seen.append(float(loss))
        params = {sharding._path_str(kp): np.asarray(x)
                  for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        q = state[0]["layers"][0]["self_attn"]["q_proj"]["kernel"]
        q = getattr(q, "value", q)
        # The sampler and teacher scoring run on the sharded model and batch as they are: their jits
        # follow the input shardings (computation follows data).
        model, _ = nnx.merge(graphdef, state)
        prompt = sharding.shard_batch({"p": tokens[:, :6], "m": attn[:, :6]}, mesh)
        roll = sample(model, prompt["p"], prompt["m"], jax.random.key(0),
                      SamplingConfig(temperature=0.0, max_new_tokens=4), eos_id=1)
        payload = teacher.score(model, *sharding.shard_batch((tokens, attn), mesh), 4)
        extra = {"sample_tokens": np.asarray(roll.tokens_BxL), "sample_logprobs": np.asarray(roll.logprobs_BxL),
                 "score_ids": np.asarray(payload.topk_ids_BxLxK),
                 "score_logprobs": np.asarray(payload.topk_logprobs_BxLxK)}
        return losses_seen, params, q.addressable_shards[0].data.shape, len(q.sharding.device_set), extra

    out = {}
    for name, shape in MESHES.items():
        loss_seq, params, q_shard, n_dev, extra = run(shape)
        for k, v in extra.items():
            out[f"{name}:{k}"] = v
        out[f"{name}:loss"] = np.asarray(loss_seq)
        out[f"{name}:q_shard"] = np.asarray(q_shard)
        out[f"{name}:q_devices"] = np.asarray(n_dev)
        for k, v in params.items():
            out[f"{name}:param:{k}"] = v
    np.savez(out_path, **out)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def test_eight_devices_match_one_device(eight_device_results):
    r = eight_device_results
    ref_loss = r["1dev:loss"]
    assert np.all(np.isfinite(ref_loss)) and ref_loss[1] < ref_loss[0]  # the update does something
    ref_params = {k.split(":param:")[1]: v for k, v in r.items() if k.startswith("1dev:param:")}
    assert any("opt_state" in k and "/mu/" in k for k in ref_params)  # AdamW moments compared too
    for name in MESHES:
        if name == "1dev":
            continue
        np.testing.assert_allclose(r[f"{name}:loss"], ref_loss, rtol=1e-5, atol=1e-5, err_msg=name)
        for k, ref in ref_params.items():
            np.testing.assert_allclose(r[f"{name}:param:{k}"], ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} {k}")


def test_sampler_and_teacher_scoring_match_on_eight_devices(eight_device_results):
    r = eight_device_results
    for name in MESHES:
        np.testing.assert_array_equal(r[f"{name}:sample_tokens"], r["1dev:sample_tokens"], err_msg=name)
        np.testing.assert_array_equal(r[f"{name}:score_ids"], r["1dev:score_ids"], err_msg=name)
        np.testing.assert_allclose(r[f"{name}:sample_logprobs"], r["1dev:sample_logprobs"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r[f"{name}:score_logprobs"], r["1dev:score_logprobs"], rtol=1e-5, atol=1e-5)


def test_parameters_really_are_sharded(eight_device_results):
    r = eight_device_results
    assert int(r["1dev:q_devices"]) == 1
    assert int(r["dp2_fsdp2_tp2:q_devices"]) == 8
    # q_proj kernel [D=32, H*E=32] under P("fsdp", "tensor"): one device holds a [32/fsdp, 32/tensor] block.
    assert tuple(r["1dev:q_shard"]) == (32, 32)
    assert tuple(r["dp2_fsdp2_tp2:q_shard"]) == (16, 16)
    assert tuple(r["fsdp8:q_shard"]) == (4, 32)


def test_rules_and_fallbacks():
    mesh = sharding.make_mesh()  # one device: every axis has size 1
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sharding.spec_for("layers/3/self_attn/q_proj/kernel", (32, 64), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for("opt_state/0/mu/embed_tokens/embedding", (128, 32), mesh) == P("tensor", "fsdp")
    assert sharding.spec_for("layers/0/input_layernorm/weight", (32,), mesh) == P()
    assert sharding.spec_for("step", (), mesh) == P()
    assert sharding.batch_spec((8, 12), mesh) == P(("data", "fsdp"))


def test_fit_spec_drops_axes_that_do_not_divide():
    devs = np.array(jax.devices() * 8)[:8]  # fit_spec only reads mesh.shape; devices may repeat here
    mesh = jax.sharding.Mesh(devs.reshape(2, 2, 2), sharding.AXES)
    assert sharding.fit_spec(P("fsdp", "tensor"), (32, 6), mesh) == P("fsdp", "tensor")
    assert sharding.fit_spec(P("fsdp", "tensor"), (3, 6), mesh) == P(None, "tensor")
    assert sharding.fit_spec(P(("data", "fsdp")), (6, 5), mesh) == P("data")
    assert sharding.fit_spec(P(("data", "fsdp")), (8, 5), mesh) == P(("data", "fsdp"))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="exceeds"):
        sharding.make_mesh(data=jax.device_count() + 1, fsdp=1)
    with pytest.raises(ValueError, match=r"mesh\.tensor"):
        sharding.make_mesh(tensor=0)


if __name__ == "__main__":
    _worker(sys.argv[1])

"""The real trainer update (`OPDStepper`) on 8 simulated CPU devices == the same update on one device.

XLA_FLAGS must be set before JAX initializes its backend, so the multi-device run happens in a subprocess
(this file run as a script) with `--xla_force_host_platform_device_count=8`. That process runs 3 updates of
`opd.train.opd_step.OPDStepper` for lsm, sampled_token (2 minibatches) and full_rkl, chunked and unchunked,
on a one-device mesh and on a data=2 x fsdp=4 mesh (full_rkl chunked also on data=2 x fsdp=2 x tensor=2),
from the same seeds and batches, and writes every metric and the final train state; the tests compare
them. Teacher scoring and the sampler run on the placed model too, and on the tensor-parallel mesh the worker
records what the compiled gradient of the student's log-probs all-gathers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from opd import sharding

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"1dev": (1, 1, 1), "dp2_fsdp4": (2, 4, 1), "dp2_fsdp2_tp2": (2, 2, 2)}  # (data, fsdp, tensor)
RUNS = {  # name -> (objective, minibatches_per_step, chunk_size); chunk 5 over L=12: 3 chunks, the last padded
    "lsm": ("lsm", 1, None), "lsm_chunked": ("lsm", 1, 5),
    "sampled_token": ("sampled_token", 2, None), "sampled_token_chunked": ("sampled_token", 2, 5),
    "full_rkl": ("full_rkl", 1, None), "full_rkl_chunked": ("full_rkl", 1, 5),
}
TENSOR_RUNS = ("full_rkl_chunked",)  # the tensor-parallel mesh runs only these (student and teacher heads)
STEPS, B, L, PROMPT, K = 3, 16, 12, 6, 4


def loss_cfg(name: str):
    return SimpleNamespace(name=name, k=K, aggregation="sequence_mean", clip_eps=0.2, dual_clip=3.0,
                           mask_special_tokens=False, rollout_top_p=1.0)


def opt_cfg(minibatches: int):
    # eps 1e-4, not 1e-8: Adam maps a gradient entry g near 0 to a step lr·g/(|g| + eps), so the float32
    # rounding δg of another reduction order (the embedding scatter-add of a rare token, say) moves that
    # parameter by lr·δg/eps; a tiny eps turns rounding noise into differences above the 1e-5 tolerance.
    # That is the optimizer's conditioning, not the sharding this file tests.
    return SimpleNamespace(name="adamw", lr=1e-2, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-4, grad_clip=1.0,
                           warmup_steps=0, minibatches_per_step=minibatches)


# ---------------------------------------------------------------------------------------------------------
# Worker: runs in the 8-device subprocess.
# ---------------------------------------------------------------------------------------------------------


def _worker(out_path: str) -> None:
    from flax import nnx

    from opd import teacher as teacher_mod
    from opd.model import ModelConfig, Transformer, forward_logprobs
    from opd.sampling import SamplingConfig, sample
    from opd.train.opd_step import OPDStepper, build_batch

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_numpy_rank_promotion", "raise")  # style.md E8
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, attention_bias=True, family="qwen2")

    def models():
        return Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))

    def batches():
        """STEPS rollout-like batches (host arrays): left padding, ragged responses, π_old from the student
        that starts every run, the teacher's payload from opd.teacher.score on one device."""
        student, teacher = models()
        out = []
        for s in range(STEPS):
            rng = np.random.default_rng(s)
            tokens = rng.integers(1, cfg.vocab_size, (B, L)).astype(np.int32)
            attn = np.ones((B, L), np.int32)
            resp = np.zeros((B, L), np.int32)
            resp[:, PROMPT:] = 1
            for b in range(B):
                attn[b, : b % 3] = 0  # left padding of varying length
                attn[b, L - b % 4:] = 0  # responses of varying length
            resp *= attn
            tokens *= attn
            logprobs = np.asarray(forward_logprobs(student, tokens, attn)) * resp
            payload = teacher_mod.score(teacher, tokens, attn, K)
            rollout = SimpleNamespace(tokens_BxL=tokens, attention_mask_BxL=attn, response_mask_BxL=resp,
                                      logprobs_BxL=logprobs)
            out.append(jax.tree.map(np.asarray, build_batch(rollout, payload)))
        return out

    def gathered_ranks(student, batch, mesh):
        """Rank of every array all-gathered in the compiled gradient of the student's log-probs on `mesh`."""
        graphdef, params = nnx.split(student)
        tokens, mask = sharding.shard_batch((batch.tokens_BxL, batch.attention_mask_BxL), mesh)
        grad = jax.jit(jax.grad(lambda p, t, m: forward_logprobs(nnx.merge(graphdef, p), t, m).sum()))
        hlo = grad.lower(params, tokens, mask).compile().as_text()
        return [len(dims.split(",")) for dims in re.findall(r"= \w+\[([\d,]+)\]\S* all-gather", hlo)]

    data = batches()
    out = {}
    for mesh_name, shape in MESHES.items():
        mesh = sharding.make_mesh(*shape)
        for run, (objective, minibatches, chunk) in RUNS.items():
            if mesh_name == "dp2_fsdp2_tp2" and run not in TENSOR_RUNS:
                continue
            student, teacher = models()
            t_graphdef, t_state = nnx.split(teacher)
            stepper = OPDStepper(student, loss_cfg(objective), opt_cfg(minibatches), mesh=mesh, chunk_size=chunk,
                                 teacher_graphdef=t_graphdef)
            if f"{mesh_name}:q_shard" not in out:  # the placed student, before any update
                q = student.layers[0].self_attn.q_proj.kernel[...]
                out[f"{mesh_name}:q_shard"] = np.asarray(q.addressable_shards[0].data.shape)
                out[f"{mesh_name}:q_devices"] = np.asarray(len(q.sharding.device_set))
                if mesh_name == "dp2_fsdp2_tp2":  # the mesh that splits heads, the only one the test reads
                    out[f"{mesh_name}:gather_ranks"] = np.asarray(gathered_ranks(student, data[0], mesh))
            if run == "lsm":  # the sampler and the teacher scoring on the placed model
                prompt, pmask = sharding.shard_batch((data[0].tokens_BxL[:, :PROMPT],
                                                      data[0].attention_mask_BxL[:, :PROMPT]), mesh)
                roll = sample(student, prompt, pmask, jax.random.key(0),
                              SamplingConfig(temperature=0.0, max_new_tokens=4), eos_id=1)
                payload = teacher_mod.score(teacher, data[0].tokens_BxL, data[0].attention_mask_BxL, K,
                                            chunk_size=5, mesh=mesh)
                out[f"{mesh_name}:sample_tokens"] = np.asarray(roll.tokens_BxL)
                out[f"{mesh_name}:sample_logprobs"] = np.asarray(roll.logprobs_BxL)
                out[f"{mesh_name}:score_ids"] = np.asarray(payload.topk_ids_BxLxK)
                out[f"{mesh_name}:score_logprobs"] = np.asarray(payload.topk_logprobs_BxLxK)
                out[f"{mesh_name}:score_sampled"] = np.asarray(payload.sampled_logprobs_BxL)
            for step, batch in enumerate(data):
                metrics = stepper.update(batch, t_state)
                for k, v in metrics.items():
                    out[f"{mesh_name}:{run}:{step}:metric:{k}"] = np.asarray(v)
            for kp, x in jax.tree_util.tree_flatten_with_path(stepper.state)[0]:
                out[f"{mesh_name}:{run}:state:{sharding._path_str(kp)}"] = np.asarray(x)
    np.savez(out_path, **out)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.npz"
    env = dict(os.environ)
    # the suite's cheaper code generation (conftest.py) is inherited; both meshes use the same flags
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def _select(r: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}


@pytest.mark.parametrize("mesh,run", [("dp2_fsdp4", r) for r in RUNS] + [("dp2_fsdp2_tp2", r) for r in TENSOR_RUNS])
def test_trainer_on_eight_devices_matches_one_device(eight_device_results, mesh, run):
    r = eight_device_results
    ref, got = _select(r, f"1dev:{run}:"), _select(r, f"{mesh}:{run}:")
    assert set(got) == set(ref)
    metrics = {k for k in ref if ":metric:" in k}
    names = {k.split(":metric:")[1] for k in metrics}
    assert {"loss", "grad_norm", "entropy", "student_topk_mass", "clip_frac", "logprob_gap"} <= names
    assert any("opt_state" in k and "/mu/" in k for k in ref)  # AdamW moments compared too
    losses = [float(ref[f"{s}:metric:loss"]) for s in range(STEPS)]
    assert all(np.isfinite(losses)) and float(ref["0:metric:grad_norm"]) > 0
    # the update's peak memory is per device: the mesh splits the state and the batch, so it is smaller there
    peak = "0:metric:update_peak_bytes"
    assert 0 < int(got.pop(peak)) < int(ref.pop(peak))
    for k in sorted(ref):
        if not k.endswith(":metric:update_peak_bytes"):
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f"{run} {k}")


@pytest.mark.parametrize("objective", ["lsm", "sampled_token", "full_rkl"])
def test_chunked_update_matches_unchunked(eight_device_results, objective):
    r = eight_device_results
    for mesh in ("1dev", "dp2_fsdp4"):
        ref, got = _select(r, f"{mesh}:{objective}:"), _select(r, f"{mesh}:{objective}_chunked:")
        assert set(got) == set(ref)
        for k in sorted(ref):
            if not k.endswith(":metric:update_peak_bytes"):  # what chunking changes (tests/test_train.py)
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f"{mesh} {objective} {k}")


def test_sampler_and_teacher_scoring_match_on_eight_devices(eight_device_results):
    r = eight_device_results
    np.testing.assert_array_equal(r["dp2_fsdp4:sample_tokens"], r["1dev:sample_tokens"])
    np.testing.assert_array_equal(r["dp2_fsdp4:score_ids"], r["1dev:score_ids"])
    for k in ("sample_logprobs", "score_logprobs", "score_sampled"):
        np.testing.assert_allclose(r[f"dp2_fsdp4:{k}"], r[f"1dev:{k}"], rtol=1e-5, atol=1e-5, err_msg=k)


def test_attention_stays_head_local_on_a_mesh_that_splits_heads(eight_device_results):
    """With kv heads split over `tensor`, attention's per-head activations (the model's only arrays of rank
    >= 4) are never all-gathered; parameters and [B, T, ·] activations are (rank <= 3). Folding batch and kv
    heads into one axis made GSPMD gather them (results/notes/45_speed.md, "Meshes"), which this catches."""
    ranks = eight_device_results["dp2_fsdp2_tp2:gather_ranks"]
    assert len(ranks) > 0 and max(ranks) <= 3, sorted(ranks)


def test_parameters_really_are_sharded(eight_device_results):
    r = eight_device_results
    assert int(r["1dev:q_devices"]) == 1 and int(r["dp2_fsdp4:q_devices"]) == 8 == int(r["dp2_fsdp2_tp2:q_devices"])
    # q_proj kernel [D=32, H*E=32] under P("fsdp", "tensor"): one device holds a [32/fsdp, 32/tensor] block.
    assert tuple(r["1dev:q_shard"]) == (32, 32)
    assert tuple(r["dp2_fsdp4:q_shard"]) == (8, 32)
    assert tuple(r["dp2_fsdp2_tp2:q_shard"]) == (16, 16)


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

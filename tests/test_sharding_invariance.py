"""Correctness first: one f32 train step gives the same loss and params under every layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.train_step import TrainProgram
from tests.conftest import initial_state, require_devices

LAYOUTS = [
    "data=8",
    "fsdp=8",
    "fsdp=4,tensor=2",
    "data=2,tensor=4",
    "data=2,sequence=4",
    "fsdp=2,sequence=2,tensor=2",
]
MOE_LAYOUTS = ["expert=8", "expert=4,tensor=2"]
# MoE and MLA compiles are slow on 2 cores: each checks the layouts that touch what it adds (the batch
# axes and sequence for the dispatch, and expert parallelism; tensor and sequence for MLA's heads and
# latents); the dense model runs all six.
LAYOUTS_FOR = {
    "tiny-moe": ["data=8", "fsdp=8", "data=2,sequence=4", *MOE_LAYOUTS],
    "tiny-mla": ["data=8", "fsdp=4,tensor=2", "data=2,sequence=4", "fsdp=2,sequence=2,tensor=2"],
}
WORKLOAD = Workload(global_batch=8, seq_len=32, dtype="float32")


def _one_step(cfg, spec: str):
    strategy = Strategy.parse(spec)
    mesh = MeshSpec.from_strategy(strategy).build(jax.devices())
    prog = TrainProgram(cfg, WORKLOAD, strategy, mesh)
    state = initial_state(prog)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    state, metrics = prog.step_fn(state, jax.device_put(jnp.asarray(tokens), prog.batch_sharding))
    return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe", "tiny-mla"])
def test_same_loss_and_params_under_every_layout(model):
    require_devices(8)
    cfg = get_preset(model)
    ref_loss, ref_params = _one_step(cfg, "data=1")
    for spec in LAYOUTS_FOR.get(model, LAYOUTS):
        loss, params = _one_step(cfg, spec)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=spec)
        for a, b in zip(params, ref_params):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=spec)


def test_microbatching_matches_one_big_batch_for_dense():
    require_devices(8)
    cfg = get_preset("tiny-dense")
    ref_loss, ref_params = _one_step(cfg, "data=2,fsdp=2,tensor=2")
    loss, params = _one_step(cfg, "data=2,fsdp=2,tensor=2,microbatches=2")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_qkv_is_the_same_math():
    """One [d, kv_heads, heads/kv_heads + 2, head_dim] matmul instead of three: with the separate
    weights converted by `fuse_qkv`, the f32 step gives the same loss and the same updated weights
    under a tensor=2 layout (GQA with q/k/v biases, which fuse the same way)."""
    from codesign.models.layers import fuse_qkv

    require_devices(8)
    cfg = get_preset("tiny-dense").replace(qkv_bias=True)
    strategy = Strategy.parse("fsdp=4,tensor=2")
    mesh = MeshSpec.from_strategy(strategy).build(jax.devices())
    sep = TrainProgram(cfg, WORKLOAD, strategy, mesh)
    fused = TrainProgram(cfg.replace(fused_qkv=True), WORKLOAD, strategy, mesh)
    assert cfg.heads > cfg.kv_heads  # GQA: each kv group carries several query heads

    def to_fused(params):
        out = jax.tree.map(lambda x: x, params)
        for blocks in (k for k in out if k.endswith("blocks")):
            attn = out[blocks]["attn"]
            attn["wqkv"] = fuse_qkv(attn.pop("wq"), attn.pop("wk"), attn.pop("wv"))
            if "bq" in attn:
                attn["bqkv"] = fuse_qkv(attn.pop("bq"), attn.pop("bk"), attn.pop("bv"))
        return out

    state = sep.init(seed=0)
    params = jax.device_get(to_fused(state["params"]))
    fused_state = jax.device_put(
        {"params": params, "opt_state": fused.optimizer.init(params), "step": np.zeros((), np.int32)},
        fused.state_shardings,
    )
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    a, ma = sep.step_fn(state, jax.device_put(jnp.asarray(tokens), sep.batch_sharding))
    b, mb = fused.step_fn(fused_state, jax.device_put(jnp.asarray(tokens), fused.batch_sharding))
    np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=1e-6)
    want, got = to_fused(jax.device_get(a["params"])), jax.device_get(b["params"])
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model,spec", [("tiny-moe", "expert=4,data=2")])  # experts, dense params and batch
def test_init_gives_the_same_values_under_every_layout(model, spec):
    """The same-loss tests start every layout from one host-side init (`conftest.initial_state`); that is
    sound only if a layout's own `init` (straight into its shardings) gives those values bit for bit."""
    require_devices(8)
    cfg = get_preset(model)
    strategy = Strategy.parse(spec)
    prog = TrainProgram(cfg, WORKLOAD, strategy, MeshSpec.from_strategy(strategy).build(jax.devices()))
    own, shared = jax.device_get(prog.init(seed=0)), jax.device_get(initial_state(prog))
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(shared)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

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
from tests.conftest import require_devices

LAYOUTS = [
    "data=8",
    "fsdp=8",
    "fsdp=4,tensor=2",
    "data=2,tensor=4",
    "data=2,sequence=4",
    "fsdp=2,sequence=2,tensor=2",
]
MOE_LAYOUTS = ["expert=8", "expert=4,tensor=2"]
WORKLOAD = Workload(global_batch=8, seq_len=32, dtype="float32")


def _one_step(cfg, spec: str):
    strategy = Strategy.parse(spec)
    mesh = MeshSpec.from_strategy(strategy).build(jax.devices())
    prog = TrainProgram(cfg, WORKLOAD, strategy, mesh)
    state = prog.init(seed=0)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    state, metrics = prog.step_fn(state, jax.device_put(jnp.asarray(tokens), prog.batch_sharding))
    return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe", "tiny-mla"])
def test_same_loss_and_params_under_every_layout(model):
    require_devices(8)
    cfg = get_preset(model)
    ref_loss, ref_params = _one_step(cfg, "data=1")
    # MoE compiles are slow on 2 cores: the five base layouts plus expert parallelism make 7.
    layouts = LAYOUTS[:5] + MOE_LAYOUTS if cfg.is_moe else LAYOUTS
    for spec in layouts:
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

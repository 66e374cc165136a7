"""Gradient accumulation reduces over the data replicas once per step (DESIGN.md "Fidelity"): in the
compiled program the collectives over `data` do not grow with microbatches, and loss, params and
optimizer state match one device without accumulation. 8 emulated CPU devices.

The helpers here are shared with tests/test_zero.py: one compile per layout per session (each
compile is the slow part on 2 cores), executed through the compiled object itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.compile.hlo import analyze_hlo
from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.state_layout import OptimizerConfig
from codesign.train_step import TrainProgram
from tests.conftest import require_devices

CFG = get_preset("tiny-dense")
# f32 compute, so that layouts and microbatch counts agree to f32 rounding; 32 rows let data=8 run
# 4 microbatches of one row per replica.
WL = Workload(global_batch=32, seq_len=16, dtype="float32")
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
STEPS = 2
REFERENCE = "data=1"  # one device: no collectives, no accumulation


@functools.cache
def program(spec: str):
    """(TrainProgram, its compiled step) for `spec`."""
    s = Strategy.parse(spec)
    prog = TrainProgram(CFG, WL, s, MeshSpec.from_strategy(s).build(jax.devices()), optimizer=OPT)
    return prog, prog.lower().compile()


@functools.cache
def initial_state():
    """One init, on the host, for every layout (each program's own init would be another compile)."""
    prog, _ = program(REFERENCE)
    return jax.tree.map(np.asarray, prog.init(seed=0))


@functools.cache
def batches() -> np.ndarray:
    return np.asarray(
        jax.random.randint(
            jax.random.key(1), (STEPS + 1, WL.global_batch, WL.seq_len + 1), 0, CFG.vocab_size, jnp.int32
        )
    )


def step(spec: str, state, i: int):
    """Run batch i through `spec`'s compiled step: (new state, loss)."""
    prog, compiled = program(spec)
    state = jax.device_put(state, prog.state_shardings)
    state, metrics = compiled(state, jax.device_put(batches()[i], prog.batch_sharding))
    return state, float(metrics["loss"])


@functools.cache
def trained(spec: str):
    """(losses, final state on the host) after STEPS steps of `spec` from initial_state()."""
    require_devices(8)
    state, losses = initial_state(), []
    for i in range(STEPS):
        state, loss = step(spec, state, i)
        losses.append(loss)
    return tuple(losses), jax.tree.map(np.asarray, state)


def assert_same_training(spec: str, reference: str = REFERENCE) -> None:
    """Losses, params and AdamW moments of `spec` match `reference` to f32 rounding. The moments matter:
    Adam's update is invariant to the gradient's scale, so params alone would not catch a wrong
    1/(replicas*microbatches); mu and nu would."""
    ref_losses, ref_state = trained(reference)
    losses, state = trained(spec)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=spec)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref_state)):
        scale = float(np.max(np.abs(b))) or 1.0
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{spec} {jax.tree_util.keystr(path)}"
        )


def collectives(spec: str, axis: str = "data"):
    """The compiled step's collectives whose groups span mesh axis `axis` (loop trip counts applied)."""
    prog, compiled = program(spec)
    return [c for c in analyze_hlo(compiled.as_text(), prog.strategy.mesh).collectives if axis in c.mesh_axes]


def total(colls, kind: str | None = None) -> tuple[int, int]:
    """(count, bytes) over `colls` of one kind (all kinds when None)."""
    rows = [c for c in colls if kind is None or c.kind == kind]
    return sum(c.count for c in rows), sum(c.bytes * c.count for c in rows)


def local_bytes(tree) -> int:
    """Bytes each device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


LAYOUTS = ["data=8", "data=2,fsdp=2,tensor=2"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_reduce_over_data_once_per_step(layout):
    require_devices(8)
    one, four = collectives(layout), collectives(f"{layout},microbatches=4")
    prog4, compiled4 = program(f"{layout},microbatches=4")
    # The microbatch loop is really there: 4 trips.
    assert 4 in {trips for _, trips, _ in analyze_hlo(compiled4.as_text(), prog4.strategy.mesh).while_loops}
    # Before: one all-reduce over data per microbatch inside the loop (data=8: 0.53 MB -> 2.1 MB with 4
    # microbatches). Now the only collective over data is one psum after the loop, of exactly the f32
    # gradient each device holds (plus the loss scalars)...
    assert {c.kind for c in four} == {"all-reduce"}
    assert total(four)[1] == pytest.approx(local_bytes(prog4.abstract_params), rel=0.01)
    # ... no more than the step without accumulation moves over data (which XLA reduces itself).
    assert total(four)[1] <= total(one)[1] * 1.01 and total(four)[0] <= total(one)[0]
    # FSDP (ZeRO-3) still gathers its params per microbatch inside the loop.
    if "fsdp" in layout:
        assert (
            total(collectives(f"{layout},microbatches=4", "fsdp"), "all-gather")[0]
            > total(collectives(layout, "fsdp"), "all-gather")[0]
        )


@pytest.mark.parametrize(
    "spec",
    ["data=8", "data=8,microbatches=4", "data=2,fsdp=2,tensor=2", "data=2,fsdp=2,tensor=2,microbatches=4"],
)
def test_same_training_as_one_device_without_accumulation(spec):
    assert_same_training(spec)


def _program(spec: str) -> TrainProgram:
    s = Strategy.parse(spec)
    return TrainProgram(CFG, WL, s, MeshSpec.from_strategy(s).build(jax.devices()))


def test_replica_axes_are_the_batch_axes_that_shard_no_param():
    require_devices(8)
    assert _program("data=2,fsdp=2,tensor=2").replica_axes == ("data",)
    # fsdp shards params (ZeRO-3: the partitioner reduces their gradients per microbatch)
    assert _program("fsdp=8").replica_axes == ()
    # an expert axis on a dense model shards no param: a pure replica axis as well
    assert _program("data=2,expert=2,tensor=2").replica_axes == ("data", "expert")

"""A master copy of the params in the optimizer (`Workload.master_dtype`): bf16 weights, f32 master
weights sharded like the AdamW moments (ZeRO shards them too), gradients accumulated and reduced once
per step in f32, the new weights gathered back in bf16. Megatron-LM's and DeepSeek-V3's mixed
precision. 8 emulated CPU devices."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.closed_form import analytic_report
from codesign.closed_form.memory import analytic_memory
from codesign.compile.hlo import analyze_hlo
from codesign.config import ConfigError, Workload
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.train_step import TrainProgram
from tests.conftest import initial_state, require_devices

CFG = get_preset("tiny-dense")
# f32 compute, so that layouts differ only by reduction order; the weights are bf16 either way.
WL = Workload(global_batch=16, seq_len=16, dtype="float32", param_dtype="bfloat16", master_dtype="float32")
STEPS = 3


@functools.cache
def _layout(spec: str, wl: Workload = WL) -> TrainProgram:
    s = Strategy.parse(spec)
    return TrainProgram(CFG, wl, s, MeshSpec.from_strategy(s).build(jax.devices()))


@functools.cache
def _program(spec: str, wl: Workload = WL):
    prog = _layout(spec, wl)
    return prog, prog.lower().compile()


@functools.cache
def _trained(spec: str):
    prog, compiled = _program(spec)
    state, losses = initial_state(prog), []
    for i in range(STEPS):
        tokens = np.random.RandomState(i).randint(0, CFG.vocab_size, (16, 17)).astype(np.int32)
        state, m = compiled(state, jax.device_put(jnp.asarray(tokens), prog.batch_sharding))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state)


def test_master_dtype_must_be_wider_than_the_params():
    with pytest.raises(ConfigError, match="not wider than param_dtype float32"):
        Workload(master_dtype="float32")
    assert "master_dtype" not in Workload().to_json()  # plan files and cache keys as before the field
    assert Workload.from_json(WL.to_json()) == WL


@pytest.mark.parametrize(
    "spec",
    [
        "data=8,microbatches=2,zero=1",
        pytest.param("data=4,fsdp=2,microbatches=2,zero=2", marks=pytest.mark.slow),
        pytest.param("pipeline=2,data=4,microbatches=2", marks=pytest.mark.slow),
    ],
)
def test_same_training_under_every_layout(spec):
    """Losses, master weights and AdamW moments match one replica's accumulation; the weights are the
    master's cast, and the master holds what bf16 drops."""
    require_devices(8)
    ref_losses, ref = _trained("data=1,microbatches=2")
    losses, state = _trained(spec)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # The backward's gradients of bf16 weights are bf16: each layout rounds its own partial sums to
    # bf16 before the f32 accumulation, so the moments agree to bf16 rounding (2^-8), and Adam turns
    # that into update noise of a fraction of an update (lr is at most 1e-4 here). A wrong gradient
    # scale would move the moments by whole factors.
    for part in ("master", "opt_state"):
        for a, b in zip(jax.tree.leaves(state[part]), jax.tree.leaves(ref[part]), strict=True):
            atol = 1e-5 if part == "master" else 1e-2 * float(np.max(np.abs(b)))
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=atol, err_msg=part)
    for w, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["master"]), strict=True):
        assert w.dtype == jnp.bfloat16 and m.dtype == jnp.float32
        np.testing.assert_array_equal(w, m.astype(jnp.bfloat16))
    moved = [
        np.any(m != w.astype(np.float32))
        for w, m in zip(*map(jax.tree.leaves, (state["params"], state["master"])))
    ]
    assert any(moved)


def test_state_bytes_and_collectives_follow_the_closed_form():
    """ZeRO-1 over data=8: the compiled step's arguments are bf16 weights + f32 master and moments
    sharded 8 ways, as the memory model says; its once-per-step reduce-scatter and all-gather move
    what the closed form's do (XLA:CPU runs bf16 collectives in f32; on an accelerator the closed
    form gathers the weights back in bf16, half the f32 gradients' bytes)."""
    require_devices(8)
    spec = "data=8,microbatches=2,zero=1"
    _, compiled = _program(spec)
    s = Strategy.parse(spec)
    mem = analytic_memory(CFG, WL, s)
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args == pytest.approx(mem.params + mem.optimizer + mem.master, rel=1e-3)
    assert mem.master == pytest.approx(2 * mem.params / 8) and mem.optimizer == pytest.approx(2 * mem.master)
    colls = [c for c in analyze_hlo(compiled.as_text(), s.mesh).collectives if "data" in c.mesh_axes]

    def moved(rows, kind):
        return sum(c.bytes * c.count for c in rows if c.kind == kind)

    for platform in ("cpu", "tpu"):
        cf = [c for c in analytic_report(CFG, WL, s, platform=platform).collectives if "data" in c.mesh_axes]
        if platform == "cpu":
            for kind in ("reduce-scatter", "all-gather"):
                assert moved(cf, kind) == pytest.approx(moved(colls, kind), rel=0.01), kind
        else:
            assert moved(cf, "reduce-scatter") == pytest.approx(2 * moved(cf, "all-gather"))


def test_checkpoints_move_between_runs_with_and_without_a_master_copy(tmp_path):
    """A state saved with f32 params restores into a run with bf16 weights and an f32 master (the
    master is the saved params, exactly), and a state saved with a master restores into an f32 run
    (its params are the master, not the bf16 weights); both verified against their saved digests."""
    from codesign.train.checkpoint import Checkpointer

    require_devices(8)
    spec = "data=4,fsdp=2,microbatches=2,zero=1"
    f32 = dataclasses.replace(WL, param_dtype="float32", master_dtype=None)
    plain, mixed = _layout(spec, f32), _layout(spec)
    # Distinct values everywhere (a fresh init's moments are zero).
    saved = jax.tree.map(
        lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, initial_state(plain)
    )

    def roundtrip(src, dst, state, name):
        with Checkpointer(tmp_path / name, async_save=False, rows=src.logical_rows(state)) as ck:
            ck.save(1, state, {})
        args = {"rows": dst.logical_rows(dst.abstract_state), "adapt": dst.checkpoint_adapter}
        with Checkpointer(tmp_path / name, read_only=True, **args) as ck:
            got = ck.restore(1, dst.abstract_state)
        assert got.verified
        assert jax.tree.structure(got.state) == jax.tree.structure(dst.abstract_state)
        for a, b in zip(jax.tree.leaves(got.state), jax.tree.leaves(dst.abstract_state), strict=True):
            assert a.dtype == b.dtype and a.sharding == b.sharding
        return jax.device_get(got.state)

    into_mixed = roundtrip(plain, mixed, saved, "plain")
    host = jax.device_get(saved)
    for m, w, p in zip(
        *(jax.tree.leaves(t) for t in (into_mixed["master"], into_mixed["params"], host["params"]))
    ):
        np.testing.assert_array_equal(m, p)
        np.testing.assert_array_equal(w, p.astype(jnp.bfloat16))
    for a, b in zip(
        jax.tree.leaves(into_mixed["opt_state"]), jax.tree.leaves(host["opt_state"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    state = jax.device_put(into_mixed, mixed.state_shardings)
    back = roundtrip(mixed, plain, state, "mixed")
    for p, m in zip(jax.tree.leaves(back["params"]), jax.tree.leaves(into_mixed["master"]), strict=True):
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, m)

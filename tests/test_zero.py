"""ZeRO-1/2 (`zero=` in the strategy): optimizer state (and for 2 the gradient accumulator) sharded over
the data replicas, params replicated over them; fsdp stays ZeRO-3. Same training as one device, the
collectives each level promises, the memory it saves, and checkpoints that restore across levels.
8 emulated CPU devices; programs are shared with tests/test_grad_accum.py."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from codesign.closed_form import analytic_report
from codesign.closed_form.memory import analytic_memory
from codesign.closed_form.params import sharded_params, zero_shards
from codesign.compile.hlo import analyze_hlo
from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.train.checkpoint import Checkpointer
from codesign.train_step import TrainProgram
from tests.conftest import initial_state, require_devices
from tests.test_grad_accum import (
    CFG,
    OPT,
    STEPS,
    WL,
    assert_same_training,
    collectives,
    local_bytes,
    program,
    step,
    total,
    trained,
)

MOE = get_preset("tiny-moe")
ZERO1 = "data=8,zero=1,microbatches=4"  # ZeRO-1 under accumulation: one reduce-scatter per step
ZERO2 = "data=4,fsdp=2,zero=2,microbatches=4"  # ZeRO-2 with FSDP (ZeRO-3) on another axis


def test_spec_round_trip_and_errors():
    s = Strategy.parse("data=4,fsdp=2,zero=2,microbatches=2")
    assert s.zero == 2 and s.spec == "data=4,fsdp=2,remat=full,microbatches=2,zero=2"
    assert Strategy.parse(s.spec) == s and Strategy.from_json(s.to_json()) == s
    assert s.replace(remat="none").zero == 2 and Strategy.parse("data=8").zero == 0
    for bad, why in [("data=2,zero=3", "zero=3"), ("data=2,zero=one", "must be 0, 1 or 2")]:
        with pytest.raises(StrategyError, match=why):
            Strategy.parse(bad)


def test_zero_without_data_axis_is_a_recorded_no_op():
    require_devices(8)
    s = Strategy.parse("fsdp=8,zero=1")
    prog = TrainProgram(CFG, WL, s, MeshSpec.from_strategy(s).build(jax.devices()))
    assert prog.zero == 0
    assert any(d.logical == "zero=1" and "data axis has size 1" in d.reason for d in prog.dropped_rules)
    fsdp = TrainProgram(CFG, WL, Strategy.parse("fsdp=8"), prog.mesh)
    assert prog.state_shardings == fsdp.state_shardings


def test_optimizer_state_sharded_after_the_params_own_axes():
    require_devices(8)
    prog, _ = program(ZERO2)
    params = prog.param_shardings
    moments = prog.opt_state_shardings[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert params["lm_head"].spec == P("fsdp") and params["dense_blocks"]["ffn"]["w_down"].spec == P(
        None, None, "fsdp"
    )
    # data goes after fsdp on the dimension FSDP shards: each device's moment slice lies inside its
    # own param shard, so the update needs no resharding, only the all-gather of the new params.
    assert moments.mu["lm_head"].spec == P(("fsdp", "data"))
    assert moments.nu["dense_blocks"]["ffn"]["w_down"].spec == P(None, None, ("fsdp", "data"))
    assert not prog.dropped_rules


@pytest.mark.parametrize("spec", [ZERO1, ZERO2])
def test_same_training_as_one_device(spec):
    assert_same_training(spec)


def test_zero1_reduce_scatters_once_and_gathers_params_once():
    require_devices(8)
    z0, z1 = collectives("data=8,microbatches=4"), collectives(ZERO1)
    grad_bytes = total(z0, "all-reduce")[1]  # the one psum of zero=0
    leaves = len(jax.tree.leaves(program(ZERO1)[0].abstract_params))
    # One reduce-scatter per leaf for the whole step (4 microbatches), moving what zero=0's psum did...
    assert total(z1, "reduce-scatter") == (leaves, pytest.approx(grad_bytes, rel=0.01))
    # ... one all-gather of the updated f32 params, and all-reduces only of scalars (loss, grad norm).
    assert total(z1, "all-gather") == (leaves, pytest.approx(grad_bytes, rel=0.01))
    assert total(z1, "all-reduce")[1] < 64


def test_zero2_reduce_scatters_every_microbatch_into_a_sharded_accumulator():
    require_devices(8)
    prog, compiled = program(ZERO2)
    colls = collectives(ZERO2)
    leaves = len(jax.tree.leaves(prog.abstract_params))
    per_device = local_bytes(prog.abstract_params)  # this device's f32 gradient under data=4,fsdp=2
    # DeepSpeed stage-2 semantics: each microbatch's gradient is reduce-scattered as it is produced
    # (kept in the loop even on TPU, whose compiler would otherwise hoist it); params gathered once.
    assert total(colls, "reduce-scatter") == (4 * leaves, pytest.approx(4 * per_device, rel=0.01))
    assert total(colls, "all-gather") == (leaves, pytest.approx(per_device, rel=0.01))
    # The accumulator is the sharded one: less temp memory than ZeRO-1's full-size accumulator.
    z1 = program("data=4,fsdp=2,zero=1,microbatches=4")[1].memory_analysis()
    assert compiled.memory_analysis().temp_size_in_bytes < z1.temp_size_in_bytes


def test_zero1_divides_optimizer_state_bytes_by_data():
    require_devices(8)
    z0, z1 = program("data=8,microbatches=4"), program(ZERO1)
    opt0, opt1 = (local_bytes(p.abstract_state["opt_state"]) for p, _ in (z0, z1))
    assert opt1 == pytest.approx(opt0 / 8, rel=0.01)
    assert local_bytes(z1[0].abstract_params) == local_bytes(z0[0].abstract_params)  # params stay replicated
    # The compiler agrees: the step's arguments shrink by 7/8 of the two AdamW moments.
    arg0, arg1 = (c.memory_analysis().argument_size_in_bytes for _, c in (z0, z1))
    assert arg0 - arg1 == pytest.approx(opt0 * 7 / 8, rel=0.01)


def test_checkpoint_restores_across_zero_levels(tmp_path):
    require_devices(8)
    base = "data=8"
    _, state = trained(base)  # STEPS steps with zero=0
    prog0, _ = program(base)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ck:
        ck.save(STEPS, jax.device_put(state, prog0.state_shardings), {"model_fingerprint": CFG.fingerprint()})
    _, next_loss = step(base, state, STEPS)
    for spec in (ZERO1, ZERO2):
        prog, _ = program(spec)
        with Checkpointer(tmp_path, read_only=True) as ck:
            got = ck.restore(None, prog.abstract_state, model_fingerprint=CFG.fingerprint())
        assert got.step == STEPS
        assert jax.tree.map(lambda x: x.sharding, got.state) == prog.state_shardings  # really the new layout
        for a, b in zip(jax.tree.leaves(got.state), jax.tree.leaves(state)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bit-identical params and moments
        _, loss = step(spec, got.state, STEPS)
        np.testing.assert_allclose(loss, next_loss, rtol=1e-6, err_msg=spec)


MOE_ZERO0 = "expert=4,data=2,microbatches=2"
MOE_ZERO1 = MOE_ZERO0 + ",zero=1"


@functools.cache
def moe_program(spec: str):
    """tiny-moe in f32 on 8 devices: (TrainProgram, compiled step)."""
    require_devices(8)
    s = Strategy.parse(spec)
    wl = Workload(global_batch=16, seq_len=16, dtype="float32")
    prog = TrainProgram(MOE, wl, s, MeshSpec.from_strategy(s).build(jax.devices()), optimizer=OPT)
    return prog, prog.lower().compile()


def test_moe_zero_shards_non_expert_state_over_expert_too():
    """expert=4 splits the batch outside the experts, so ZeRO-1 shards the attention, norm, router and
    embedding moments over data x expert (8 ways) and the expert weights' over data (expert shards
    them already): every moment is 1/8 per device. Same training; the compiler's argument bytes and
    its gather of the updated params match the closed form."""
    (p0, c0), (p1, c1) = moe_program(MOE_ZERO0), moe_program(MOE_ZERO1)
    assert p1.zero_axes == ("data", "expert") and not p1.dropped_rules
    moments = p1.abstract_state["opt_state"][1][0]
    for leaf in jax.tree.leaves((moments.mu, moments.nu)):
        assert math.prod(leaf.sharding.shard_shape(leaf.shape)) * 8 == math.prod(leaf.shape)
    assert local_bytes(p1.abstract_params) == local_bytes(p0.abstract_params)
    losses = []
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16, 17), 0, MOE.vocab_size, jnp.int32))
    for prog, compiled in ((p0, c0), (p1, c1)):
        state, run = initial_state(prog), []
        for t in tokens:
            state, metrics = compiled(state, jax.device_put(t, prog.batch_sharding))
            run.append(float(metrics["loss"]))
        losses.append((run, jax.tree.map(np.asarray, state["params"])))
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(losses[1][1]), jax.tree.leaves(losses[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for prog, compiled in ((p0, c0), (p1, c1)):
        mem = analytic_memory(MOE, prog.workload, prog.strategy)
        assert compiled.memory_analysis().argument_size_in_bytes == pytest.approx(
            mem.params + mem.optimizer, rel=1e-3
        )
    hlo = analyze_hlo(c1.as_text(), p1.strategy.mesh).collectives
    closed = analytic_report(MOE, p1.workload, p1.strategy, platform="cpu").collectives
    for axes in (("data", "expert"), ("data",)):
        got = sum(c.bytes * c.count for c in hlo if c.kind == "all-gather" and c.mesh_axes == axes)
        want = sum(c.bytes * c.count for c in closed if c.kind == "all-gather" and c.mesh_axes == axes)
        assert got == pytest.approx(want, rel=1e-3) and got > 0, axes


def test_zero_shards_follow_each_params_batch_axes():
    """The closed form's ZeRO split per param: data x expert for non-expert params of an MoE, data for
    the expert weights, expert alone without data, data alone for a dense model."""
    shards = lambda cfg, spec: {
        sp.group.name: zero_shards(cfg, s, sp)
        for s in [Strategy.parse(spec)]
        for sp in sharded_params(cfg, s)
    }
    moe = shards(MOE, MOE_ZERO1)
    assert moe["moe.w_up"] == 2 and moe["embed"] == 8 and set(moe.values()) == {2, 8}
    assert set(shards(MOE, "expert=8,zero=1").values()) == {1, 8}
    assert set(shards(MOE, MOE_ZERO0).values()) == {1}
    assert set(shards(CFG, "data=4,expert=2,zero=1").values()) == {4}

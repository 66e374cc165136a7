"""Pipeline parallelism that runs (`codesign.pipeline`): the pipelined step trains the same model as the
unpipelined one (fp32 losses equal within rtol 1e-5 over 10 steps), checkpoints move between pipelined
and unpipelined layouts, resume is bit-exact, and the compiler sees the whole pipelined program.

The one fast test trains a representative layout (pipeline=2, v=2, fsdp=2, tensor=2: interleaved
chunks, stage rotation, FSDP gathers and tensor partial sums at once) through `run_training` and
checks restore and resume with it; the matrix of other layouts is slow (each is one more compile).
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.arithmetic import pipeline_loops, pipeline_ticks
from codesign.closed_form import analytic_memory, analytic_report
from codesign.compile.hlo import analyze_hlo
from codesign.config import Workload
from codesign.pipeline import chunk_layers, layer_mask, to_stage_layout
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.train.trainer import TrainRun, run_training
from codesign.train_step import TrainProgram
from tests.conftest import initial_state, require_devices

DENSE4 = get_preset("tiny-dense").replace(layers=4)
WORKLOAD = {"mode": "train", "global_batch": 8, "seq_len": 16, "dtype": "float32"}
OPT = {"lr": 1e-2, "warmup_steps": 2, "schedule_steps": 10, "seed": 0}
STEPS = 10


def _plan(spec: str) -> dict:
    """A plan document whose choice is `spec` (fp32 workload), as `train --plan` reads it."""
    return {
        "schema": "codesign.plan/v1",
        "model": {"name": DENSE4.name},
        "workload": WORKLOAD,
        "candidates": [{"rank": 1, "strategy": Strategy.parse(spec).to_json(), "fits": True}],
        "chosen": 0,
    }


# 5 layers: uneven over 2 stages (stored padded to 6 rows, run as 8 chunk slots under v=2).
DENSE5 = DENSE4.replace(layers=5)


def _train(spec, cfg=DENSE5, steps=STEPS, **kw):
    return run_training(
        TrainRun(model=cfg, plan=_plan(spec), steps=steps, **{**OPT, **kw}), return_state=True
    )


def _losses(r):
    return [s["loss"] for s in r["steps"]]


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_stage_layout_interleaves_chunks_and_pads_uneven_splits():
    # 5 layers on p=2 stages x V=2 chunks: Lc=2, 8 slots, the last 3 are padding.
    assert chunk_layers(5, 2, 2) == 2
    layers = {"w": jnp.arange(5.0)[:, None] + 1}  # layer l holds l + 1 (padding holds 0)
    staged = np.asarray(to_stage_layout(layers, 5, 2, 2)["w"][..., 0])
    # [V, p, Lc]: chunk r*p + s is stage s's r-th chunk, so stage 0 holds layers 0,1 then 4,(pad).
    assert staged.tolist() == [[[1, 2], [3, 4]], [[5, 0], [0, 0]]]
    assert layer_mask(5, 2, 2).tolist() == [[[True, True], [True, True]], [[True, False], [False, False]]]
    assert pipeline_ticks(microbatches=4, stages=2, repeats=2) == 9  # 8 chunk-passes + 1 fill/drain


def test_pipelined_training_matches_restores_and_resumes(tmp_path):
    """pipeline=2 (v=2, fsdp, tensor; 5 layers, stored padded to 6) trains like pipeline=1 for 10
    steps; its step-5 checkpoint continues under pipeline=1 (5 rows) to the same losses; its own resume
    is bit-exact."""
    require_devices(8)
    ref_spec, pipe_spec = "fsdp=2,tensor=2,data=2", "pipeline=2,fsdp=2,tensor=2,microbatches=2,v=2"
    ref = _train(ref_spec)
    straight = _train(pipe_spec)
    assert straight["strategy"] == Strategy.parse(pipe_spec).spec
    np.testing.assert_allclose(_losses(straight), _losses(ref), rtol=1e-5)
    assert _losses(ref)[-1] < _losses(ref)[0] - 0.2  # it learns: the equality is not of constants

    ck = str(tmp_path / "ck")
    first = _train(pipe_spec, steps=5, checkpoint_dir=ck)
    resumed = _train(pipe_spec, checkpoint_dir=ck, resume=True)
    assert resumed["resumed_from"] == 5
    assert _losses(first) + _losses(resumed) == _losses(straight)  # bit-exact
    assert _bytes(resumed["state"]) == _bytes(straight["state"])

    # The checkpoint holds the stack padded to 6 rows: it restores into the pipeline=1 layout (5 rows).
    shutil.rmtree(os.path.join(ck, "10"))
    crossed = _train(ref_spec, checkpoint_dir=ck, resume=True)
    assert crossed["resumed_from"] == 5
    np.testing.assert_allclose(_losses(crossed), _losses(ref)[5:], rtol=1e-5)


# -- the layout matrix (one compile each) ------------------------------------------------------------
@functools.cache
def _one_loss_curve(cfg, spec, steps=3):
    strategy = Strategy.parse(spec)
    mesh = MeshSpec.from_strategy(strategy).build(jax.devices())
    prog = TrainProgram(cfg, Workload(**{k: v for k, v in WORKLOAD.items()}), strategy, mesh)
    state, out = initial_state(prog), []
    for i in range(steps):
        tokens = np.random.RandomState(i).randint(0, cfg.vocab_size, (8, 17)).astype(np.int32)
        state, m = prog.step_fn(state, jax.device_put(jnp.asarray(tokens), prog.batch_sharding))
        out.append(float(m["loss"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers,spec",
    [
        (4, "pipeline=2,fsdp=4,microbatches=2"),
        (4, "pipeline=4,data=2,microbatches=4"),
        (8, "pipeline=4,tensor=2,microbatches=4,v=2"),
        (8, "pipeline=4,fsdp=2,microbatches=4,v=2,schedule=gpipe"),
        (5, "pipeline=2,tensor=4,microbatches=2,v=2"),  # uneven: 5 layers in 4 chunks of 2
        (3, "pipeline=4,fsdp=2,microbatches=2"),  # fewer layers than stages: padded chunks
        (4, "pipeline=2,data=2,fsdp=2,microbatches=2,zero=1"),
        (4, "pipeline=2,data=2,tensor=2,microbatches=2,zero=2,remat=none"),
        (4, "pipeline=2,fsdp=2,tensor=2,sp=1,microbatches=2,remat=minimal"),
    ],
)
def test_pipelined_layouts_match_pipeline_1(layers, spec):
    require_devices(8)
    cfg = get_preset("tiny-dense").replace(layers=layers)
    # The reference is cached per model: one compile of it for the cases that share a layer count.
    np.testing.assert_allclose(_one_loss_curve(cfg, spec), _one_loss_curve(cfg, "data=1"), rtol=1e-5)


@pytest.mark.slow
def test_pipelined_moe_matches_accumulation():
    """tiny-moe: the dense prefix runs before the pipeline, the MoE stack in it; the aux loss is averaged
    over microbatches as gradient accumulation averages it, so pipeline=1 with the same microbatches
    is the reference."""
    require_devices(8)
    cfg = get_preset("tiny-moe").replace(layers=5)  # 1 dense + 4 MoE layers
    ref = _one_loss_curve(cfg, "data=2,microbatches=2")
    np.testing.assert_allclose(_one_loss_curve(cfg, "pipeline=2,expert=4,microbatches=2"), ref, rtol=1e-5)


def test_moe_prefix_is_split_over_the_stages_with_padded_rows():
    """An MoE model's dense prefix runs before the pipeline on the whole batch, its rows split over the
    stages (each shard's 6 rows padded to 8 for pipeline=4): the same losses as pipeline=1 with the
    same microbatches, and compiled matmul FLOPs inside the closed form's one-stage work (the prefix
    at 1/p) times the schedule's ticks/microbatches (a prefix repeated by every stage exceeds it)."""
    require_devices(8)
    cfg = get_preset("tiny-moe").replace(layers=5)  # 1 dense + 4 MoE layers
    wl = Workload(global_batch=12, seq_len=16, dtype="float32")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12, 17)).astype(np.int32)
    out = {}
    for spec in ("data=2,microbatches=2", "pipeline=4,expert=2,microbatches=2"):
        s = Strategy.parse(spec)
        prog = TrainProgram(cfg, wl, s, MeshSpec.from_strategy(s).build(jax.devices()))
        compiled = prog.lower().compile()
        state, losses = initial_state(prog), []
        for batch in tokens:
            state, m = compiled(state, jax.device_put(jnp.asarray(batch), prog.batch_sharding))
            losses.append(float(m["loss"]))
        out[spec] = losses, analyze_hlo(compiled.as_text(), s.mesh).matmul_flops, s, wl
        out["args"] = compiled.memory_analysis().argument_size_in_bytes
    np.testing.assert_allclose(
        out["pipeline=4,expert=2,microbatches=2"][0], out["data=2,microbatches=2"][0], rtol=1e-5
    )
    _, flops, s, wl = out["pipeline=4,expert=2,microbatches=2"]
    one_stage = analytic_report(cfg, wl, s, platform="cpu").matmul_flops
    assert one_stage < flops < one_stage * pipeline_ticks(2, 4, 1) / 2
    # The prefix's weights are sharded over the stages (each holds 1/4 of the dense layer), and the
    # step's arguments are what the memory model holds.
    assert all("pipeline" in str(spec) for spec in jax.tree.leaves(prog.param_specs["dense_blocks"]))
    mem = analytic_memory(cfg, wl, s)
    assert out["args"] == pytest.approx(mem.params + mem.optimizer, rel=1e-3)


def test_uneven_stack_is_stored_padded_in_the_program_and_the_memory_model():
    """5 layers do not divide over pipeline=2: the program stores the stack padded to 6 rows, 3 on each
    stage (JAX shards no uneven dimension), the same bytes as 6 layers; the closed form's params +
    optimizer state follow it: equal to the compiled step's argument bytes (state in, aliased out)."""
    require_devices(8)
    wl = Workload(global_batch=8, seq_len=16)
    s = Strategy.parse("pipeline=2,data=4,microbatches=2")
    mesh = MeshSpec.from_strategy(s).build(jax.devices())
    args = {}
    for layers in (5, 6):
        cfg = get_preset("tiny-dense").replace(layers=layers)
        prog = TrainProgram(cfg, wl, s, mesh)
        assert prog.stack_layers == (layers, 2 * -(-layers // 2))
        args[layers] = prog.lower().compile().memory_analysis().argument_size_in_bytes
        mem = analytic_memory(cfg, wl, s)
        assert args[layers] == pytest.approx(mem.params + mem.optimizer, rel=1e-3), layers
    assert args[5] == args[6]


def test_uneven_stack_checkpoints_move_between_padded_and_unpadded_layouts(tmp_path):
    """A 5-layer stack is stored as 5 rows unpipelined, 6 under pipeline=2 and 8 under pipeline=4. A
    checkpoint of any of them restores into any other (Orbax pads with zeros or drops the padding
    rows), verified by digests over the 5 real rows, with the same params and AdamW moments."""
    from codesign.train.checkpoint import Checkpointer
    from codesign.train.integrity import leaves_by_path

    require_devices(8)
    cfg = get_preset("tiny-dense").replace(layers=5)
    wl = Workload(global_batch=8, seq_len=16)
    progs = {}
    for spec in ("data=8", "pipeline=2,data=4,microbatches=2", "pipeline=4,data=2,microbatches=2"):
        s = Strategy.parse(spec)
        progs[spec] = TrainProgram(cfg, wl, s, MeshSpec.from_strategy(s).build(jax.devices()))
    rows = {spec: p.stack_layers[1] for spec, p in progs.items()}
    assert list(rows.values()) == [5, 6, 8]

    def logical(state):  # every leaf, a stack leaf cut to its 5 real rows
        n = progs["data=8"].logical_rows(state)
        return {
            p: np.asarray(x)[: n[p]] if p in n else np.asarray(x) for p, x in leaves_by_path(state).items()
        }

    # Distinct values in every row (a fresh init's moments are zero; make them not be).
    base = initial_state(progs["data=8"])
    base = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, base)
    want = logical(base)
    for src, dst in [
        ("data=8", "pipeline=2,data=4,microbatches=2"),
        ("pipeline=2,data=4,microbatches=2", "pipeline=4,data=2,microbatches=2"),
        ("pipeline=4,data=2,microbatches=2", "data=8"),
    ]:
        state = jax.device_put(progs[src].pad_stack(jax.device_get(base)), progs[src].state_shardings)
        directory = tmp_path / f"{rows[src]}-{rows[dst]}"
        with Checkpointer(directory, rows=progs[src].logical_rows(state), async_save=False) as ck:
            ck.save(1, state, {})
        with Checkpointer(directory, rows=progs[dst].logical_rows(progs[dst].abstract_state)) as ck:
            got = ck.restore(1, progs[dst].abstract_state)
        assert got.verified
        stack = got.state["params"]["dense_blocks"]
        assert all(x.shape[0] == rows[dst] for x in jax.tree.leaves(stack)), (src, dst)
        assert all(not np.asarray(x)[5:].any() for x in jax.tree.leaves(stack))  # padding is zeros
        got_rows = logical(got.state)
        assert got_rows.keys() == want.keys()
        for path, value in want.items():
            np.testing.assert_array_equal(got_rows[path], value, err_msg=path)


@pytest.mark.slow
def test_compiler_sees_the_whole_pipelined_step():
    """compile_candidate compiles every stage: the 1F1B loops' trip counts are the warm-up, steady and
    drain ticks of `arithmetic.pipeline_loops`, and the HLO walk counts one rotation forward per forward tick
    and one back per backward tick as collective-permutes on the pipeline axis."""
    require_devices(8)
    from codesign.compile.targets import compile_candidate
    from codesign.hardware.catalog import load_hardware

    s = Strategy.parse("pipeline=4,fsdp=2,microbatches=4,v=2")
    r = compile_candidate(
        DENSE4.replace(layers=8), Workload(8, 16), s, load_hardware("cpu", devices=8), "cpu"
    )
    assert r.outcome == "ok", r.message
    assert dict(r.mesh)["pipeline"] == 4 and r.pipeline_stages == 4
    warm, steady, drain = pipeline_loops(4, 4, 2)
    assert (warm, steady, drain) == (7, 4, 7)
    trips = [n for _, n, _ in r.while_loops]
    assert trips.count(7) >= 2 and steady in trips, trips
    # Forward ticks (warm-up + steady) = backward ticks = M V + p - 1, the 1F1B tick count.
    assert warm + steady == steady + drain == pipeline_ticks(4, 4, 2)
    # The rotation is a ring over all 4 stages; each moves one microbatch row per fsdp shard x 16
    # positions x 64 wide (XLA:CPU moves bf16 as f32). Other pipeline-axis traffic (the v=2 param
    # reorder, once per step) pairs stages two by two.
    ring = [
        c
        for c in r.collectives
        if c.kind == "collective-permute" and c.mesh_axes == ("pipeline",) and c.group_size == 4
    ]
    assert sum(c.count for c in ring) == 2 * pipeline_ticks(4, 4, 2), r.collectives
    assert {c.bytes for c in ring} <= {16 * 64 * 2, 16 * 64 * 4}


@pytest.mark.slow
def test_1f1b_memory_stays_flat_as_microbatches_grow():
    """The compiled 1F1B step holds a ring of min(2p - 1, M) chunk forwards, so from M=4 to M=8 (p=2,
    same microbatch size) its temp memory grows by the input buffers only, while the GPipe-order step
    keeps every microbatch's activations (measured: experiments/pipeline_compiled)."""
    require_devices(8)
    from codesign.closed_form import analytic_memory
    from codesign.compile.targets import compile_candidate
    from codesign.hardware.catalog import load_hardware

    cfg, hw = DENSE4, load_hardware("cpu", devices=8)

    def temp(schedule, m):
        s = Strategy.parse(f"pipeline=2,microbatches={m},remat=none,schedule={schedule}")
        r = compile_candidate(cfg, Workload(2 * m, 128), s, hw, "cpu")
        assert r.outcome == "ok", r.message
        return r.memory.temp

    one_mb = analytic_memory(cfg, Workload(2, 128), Strategy.parse("pipeline=2,remat=none")).saved_activations
    f1b = (temp("1f1b", 8) - temp("1f1b", 4)) / 4
    gpipe = (temp("gpipe", 8) - temp("gpipe", 4)) / 4
    assert f1b < 0.1 * one_mb, (f1b, one_mb)
    assert gpipe > 0.9 * one_mb, (gpipe, one_mb)


def test_interleaved_1f1b_names_its_microbatch_rule():
    """Interleaved 1F1B runs microbatches through the V chunks in groups of p: a count that does not
    divide is refused when the program is built, with the fix, not deep in tracing."""
    from codesign.sharding.strategy import StrategyError

    s = Strategy.parse("pipeline=2,v=2,microbatches=3")
    with pytest.raises(StrategyError, match="multiple of 2, or schedule=gpipe"):
        TrainProgram(DENSE4, Workload(6, 16), s, MeshSpec.from_strategy(s).build(jax.devices()))
    gpipe = s.replace(schedule="gpipe")  # the circular GPipe program takes any M >= p
    assert TrainProgram(DENSE4, Workload(6, 16), gpipe, MeshSpec.from_strategy(gpipe).build(jax.devices()))

"""Overlap from the compiler's schedule: the target's XLA flags, the scheduled-HLO reader (async
start/done windows, TPU async collective fusion counted once) and a deviceless TPU compile that uses both."""

from pathlib import Path

import pytest

from codesign.compile import flags as F
from codesign.compile import targets as T
from codesign.compile.devices import libtpu_available
from codesign.compile.hlo import analyze_hlo
from codesign.config import Workload
from codesign.hardware import load_hardware
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy

FIXTURE = Path(__file__).parent / "data" / "scheduled_async.hlo"
DOT = 2 * 64 * 64 * 64  # one 64x64 @ 64x64 dot


def _row(stats, kind, nbytes):
    (row,) = [c for c in stats.collectives if c.kind == kind and c.bytes == nbytes]
    return row


def test_scheduled_reader_windows_on_a_hand_written_dump():
    stats = analyze_hlo(FIXTURE.read_text(), [("fsdp", 4)])
    assert stats.scheduled and stats.skipped == 0
    # The synchronous all-reduce hides behind nothing.
    sync = _row(stats, "all-reduce", 256 * 4)
    assert (sync.count, sync.async_count, sync.overlap.flops) == (1, 0, 0.0)
    # TPU async collective fusion: the all-gather printed in its start, carrying and done fusions
    # (channel 78) is ONE all-gather, hidden by the dot of the fusion that carries it.
    fused = _row(stats, "all-gather", 64 * 64 * 2)
    assert (fused.count, fused.async_count) == (1, 1)
    assert fused.overlap.matmul_flops == DOT
    # GPU forms: all-gather-start/-done and async-start/-done (reduce-scatter) are both in flight over
    # dot.b, so each is given half of it.
    ag = _row(stats, "all-gather", 32 * 32 * 2)
    rs = _row(stats, "reduce-scatter", 128 * 32 * 4)
    assert ag.async_count == rs.async_count == 1
    assert ag.overlap.matmul_flops == rs.overlap.matmul_flops == DOT / 2
    assert stats.matmul_flops == 2 * DOT  # the windows share compute, they do not add any


def test_unscheduled_text_has_no_windows():
    text = FIXTURE.read_text().replace("is_scheduled=true, ", "")
    stats = analyze_hlo(text, [("fsdp", 4)])
    assert not stats.scheduled
    assert sum(c.count for c in stats.collectives) == 4  # the counting does not depend on the schedule


def test_flags_default_per_platform_and_override():
    tpu = dict(F.resolve_flags("tpu", "tpu"))
    assert tpu["xla_tpu_enable_async_collective_fusion_fuse_all_gather"] == "true"
    assert F.resolve_flags("cpu", "tpu") == ()
    assert F.resolve_flags("attached", "gpu") == F.resolve_flags("gpu", "gpu")
    v5p = dict(F.resolve_flags("tpu", "tpu", tpu_generation="v5p"))
    assert set(tpu) - set(v5p) == set(F.V5E_ONLY)
    assert dict(F.resolve_flags("tpu", "tpu", tpu_generation="v5e")) == tpu
    gone = dict(F.resolve_flags("tpu", "tpu", {"xla_enable_async_all_gather": ""}))
    assert "xla_enable_async_all_gather" not in gone
    assert not F.collective_matmul_on(tpu)
    assert F.collective_matmul_on(F.resolve_flags("tpu", "tpu", F.COLLECTIVE_MATMUL_FLAGS["tpu"]))
    assert F.parse_flags(["--xla_a=1", "xla_b=false"]) == (("xla_a", "1"), ("xla_b", "false"))
    with pytest.raises(F.FlagError, match="NAME=VALUE"):
        F.parse_flags(["xla_a"])


def test_a_rejected_flag_is_dropped_and_named():
    class Lowered:
        def compile(self, compiler_options=None):
            if "xla_unknown" in (compiler_options or {}):
                raise RuntimeError("INVALID_ARGUMENT: No such compile option: 'xla_unknown'")
            return "compiled"

    flags, notes = {"xla_unknown": "true", "xla_known": "1"}, []
    assert T._compile_with_flags(Lowered(), flags, notes) == "compiled"
    assert flags == {"xla_known": "1"} and "xla_unknown" in notes[0]

    class V5p:  # libtpu 0.0.52 on v5p names the parent flag of the one it refuses
        def compile(self, compiler_options=None):
            if "xla_tpu_enable_async_collective_fusion_fuse_all_gather" in (compiler_options or {}):
                raise RuntimeError(
                    "FAILED_PRECONDITION: Continuation fusion for AllGather is enabled on platform "
                    "viperfish ... Please disable it with xla_tpu_enable_async_collective_fusion=false"
                )
            return "compiled"

    flags, notes = dict(F.OVERLAP_FLAGS["tpu"]), []
    assert T._compile_with_flags(V5p(), flags, notes) == "compiled"
    assert not any(k.startswith("xla_tpu_enable_async_collective_fusion") for k in flags)
    assert "xla_tpu_overlap_compute_collective_tc" in flags and "FAILED_PRECONDITION" in notes[0]
    with pytest.raises(RuntimeError, match="other"):

        class Broken(Lowered):
            def compile(self, compiler_options=None):
                raise RuntimeError("other failure")

        T._compile_with_flags(Broken(), {"xla_known": "1"}, [])


tpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e '.[dev]')")


@pytest.mark.tpu
@tpu
def test_tpu_compile_applies_the_targets_flags_and_reads_its_schedule():
    """One tiny deviceless compile: the defaults reach libtpu (a flag it lacks is dropped, not fatal),
    the report says so, and the FSDP all-gathers of its async collective fusions are counted once
    each, as many as the closed form predicts (the HLO walk used to count each 2-4x)."""
    from codesign.closed_form import analytic_report

    cfg, wl, s = get_preset("tiny-dense"), Workload(global_batch=32, seq_len=128), Strategy.parse("fsdp=8")
    r = T.compile_candidate(
        cfg, wl, s, load_hardware("tpu-v5e", 8), "tpu", xla_flags=(("xla_no_such_flag_here", "true"),)
    )
    assert r.outcome == "ok", r.message
    assert r.xla_flags == dict(F.resolve_flags("tpu", "tpu"))
    assert any("xla_no_such_flag_here" in n for n in r.notes)
    assert r.overlap_from_schedule
    gathers = [c for c in r.collectives if c.kind == "all-gather"]
    assert any(c.async_count and c.overlap.matmul_flops > 0 for c in gathers)
    closed = analytic_report(cfg, wl, s, platform="tpu")
    # The per-layer weight matrices' gathers (norm scales are reduced differently by libtpu) match the
    # closed form's count.
    layer_rows = {
        c.bytes: c.count
        for c in closed.collectives
        if c.kind == "all-gather" and c.count > 2 and c.bytes >= 4096
    }
    assert len(layer_rows) == 2
    for nbytes, count in layer_rows.items():
        assert sum(c.count for c in gathers if c.bytes == nbytes) == count, nbytes


def test_hlo_text_falls_back_to_the_runtime_module_then_its_proto():
    """libtpu 0.0.52 fails compiled.as_text() on large programs; the module is then printed from the
    runtime executable, or rebuilt from its serialized proto; if all fail, as_text's error is raised."""
    from codesign._compat import compiled_hlo_text

    class Module:
        def __init__(self, printable):
            self.printable = printable

        def to_string(self):
            if not self.printable:
                raise RuntimeError("RET_CHECK async-update")
            return "HloModule m"

        def as_serialized_hlo_module_proto(self):
            return b"proto"

        @classmethod
        def from_serialized_hlo_module_proto(cls, proto):
            assert proto == b"proto"
            return cls(True)

    class Compiled:
        def __init__(self, printable):
            self.module = Module(printable)

        def as_text(self):
            raise RuntimeError("as_text failed")

        def runtime_executable(self):
            return self

        def hlo_modules(self):
            return [self.module]

    assert compiled_hlo_text(Compiled(True)) == ("HloModule m", "hlo_modules")
    assert compiled_hlo_text(Compiled(False)) == ("HloModule m", "hlo_module_proto")

    class Hopeless(Compiled):
        def hlo_modules(self):
            raise RuntimeError("no modules")

    with pytest.raises(RuntimeError, match="as_text failed"):
        compiled_hlo_text(Hopeless(True))


LOOP_CARRIED = """HloModule m, is_scheduled=true, num_partitions=4

%ag_start (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.1 = bf16[64,64]{1,0} all-gather(%p0), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %cc = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%ag_done (p0: bf16[16,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  %all-gather.2 = bf16[64,64]{1,0} all-gather(%p0), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %cc = bf16[64,64]{1,0} custom-call(%p0, %p1, %all-gather.2), custom_call_target="AsyncCollectiveDone"
}

%body (t: (s32[], bf16[16,64], bf16[64,64], bf16[64,64])) -> (s32[], bf16[16,64], bf16[64,64], bf16[64,64]) {
  %t = (s32[], bf16[16,64]{1,0}, bf16[64,64]{1,0}, bf16[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %w = bf16[16,64]{1,0} get-tuple-element(%t), index=1
  %buf = bf16[64,64]{1,0} get-tuple-element(%t), index=2
  %x = bf16[64,64]{1,0} get-tuple-element(%t), index=3
  %done = bf16[64,64]{1,0} fusion(%w, %buf), kind=kCustom, calls=%ag_done
  %dot.1 = bf16[64,64]{1,0} dot(%x, %done), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %start = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%w), kind=kCustom, calls=%ag_start
  %next = bf16[64,64]{1,0} get-tuple-element(%start), index=1
  %dot.2 = bf16[64,64]{1,0} dot(%dot.1, %dot.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  ROOT %r = (s32[], bf16[16,64]{1,0}, bf16[64,64]{1,0}, bf16[64,64]{1,0}) tuple(%i1, %w, %next, %dot.2)
}

%cond (t: (s32[], bf16[16,64], bf16[64,64], bf16[64,64])) -> pred[] {
  %t = (s32[], bf16[16,64]{1,0}, bf16[64,64]{1,0}, bf16[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: bf16[16,64], b: bf16[64,64], x: bf16[64,64]) -> bf16[64,64] {
  %w = bf16[16,64]{1,0} parameter(0)
  %b = bf16[64,64]{1,0} parameter(1)
  %x = bf16[64,64]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %t = (s32[], bf16[16,64]{1,0}, bf16[64,64]{1,0}, bf16[64,64]{1,0}) tuple(%zero, %w, %b, %x)
  %loop = (s32[], bf16[16,64]{1,0}, bf16[64,64]{1,0}, bf16[64,64]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %out = bf16[64,64]{1,0} get-tuple-element(%loop), index=3
}
"""


def test_a_collective_issued_for_the_next_iteration_wraps_around_the_loop_body():
    """Done before start in a loop body: the gather runs from the start (after dot.1) around to the
    next iteration's done, so dot.2 hides it, not dot.1 (which waits for it)."""
    stats = analyze_hlo(LOOP_CARRIED, [("fsdp", 4)])
    (ag,) = stats.collectives
    assert (ag.count, ag.async_count) == (3, 3)
    assert ag.overlap.matmul_flops == 3 * DOT  # dot.2 of each of the 3 iterations, never dot.1
    assert stats.matmul_flops == 6 * DOT

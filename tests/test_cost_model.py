"""The cost model (codesign.cost.estimate) on synthetic CompileReports and analytic ones."""

from __future__ import annotations

import dataclasses

import pytest

from codesign.closed_form import analytic_memory, analytic_report
from codesign.config import Workload
from codesign.cost.estimate import Estimate, estimate_analytic, estimate_from_report
from codesign.cost.network import assign_levels, collective_time_on_axes
from codesign.hardware import load_hardware
from codesign.presets import get_preset
from codesign.report import Collective, CompileReport, MemoryStats, OverlapWindow
from codesign.sharding.strategy import Strategy

CFG = get_preset("llama3-8b")
WL = Workload(global_batch=64, seq_len=2048)


def _report(strategy: Strategy, *, target="gpu", flops=2e15, colls=(), peak=10 * 2**30, outcome="ok", **kw):
    return CompileReport(
        outcome=outcome,
        target=target,
        mesh=tuple(strategy.mesh),
        flops=flops,
        matmul_flops=0.95 * flops,
        bytes_accessed=flops / 400,
        collectives=tuple(colls),
        memory=MemoryStats(peak=peak),
        **kw,
    )


def _scaled(hw, bw=1.0, flops=1.0):
    chip = dataclasses.replace(hw.chip, peak_flops={k: v * flops for k, v in hw.chip.peak_flops.items()})
    levels = tuple(dataclasses.replace(lv, bytes_per_s=lv.bytes_per_s * bw) for lv in hw.levels)
    return dataclasses.replace(hw, chip=chip, levels=levels)


STRATS = ["fsdp=16", "data=2,fsdp=8", "fsdp=2,tensor=8", "data=2,tensor=8", "fsdp=4,sequence=2,tensor=2"]


@pytest.mark.parametrize("spec", STRATS)
def test_more_bandwidth_or_flops_is_never_slower(spec):
    s = Strategy.parse(spec)
    hw = load_hardware("h100", devices=16)
    base = estimate_analytic(CFG, WL, s, hw).step_time_s
    assert estimate_analytic(CFG, WL, s, _scaled(hw, bw=2.0)).step_time_s <= base
    assert estimate_analytic(CFG, WL, s, _scaled(hw, flops=2.0)).step_time_s <= base
    assert estimate_analytic(CFG, WL, s, _scaled(hw, bw=0.5)).step_time_s >= base


def test_larger_data_axis_lowers_compute_per_device():
    wl = Workload(global_batch=128, seq_len=2048)
    prev = None
    for n in (8, 16, 32):
        e = estimate_analytic(
            CFG, wl, Strategy.parse(f"data={n // 8},fsdp=8"), load_hardware("h100", devices=n)
        )
        if prev is not None:
            assert e.compute_s == pytest.approx(prev.compute_s / 2, rel=0.1)
            assert e.step_time_s < prev.step_time_s
        prev = e


def test_two_node_h100_placements():
    hw = load_hardware("h100", devices=16)
    e = estimate_analytic(CFG, WL, Strategy.parse("data=2,tensor=8"), hw)
    assert e.placements["tensor"]["level"] == "nvlink"
    assert e.placements["data"]["level"] == "ib"
    assert any(r.startswith("tensor=8 rides nvlink") for r in e.reasons)
    e = estimate_analytic(CFG, WL, Strategy.parse("fsdp=16"), hw)
    assert e.placements["fsdp"]["levels"] == ("nvlink", "ib")
    assert "pipeline" not in e.placements
    assert set(e.to_json()["placements"]) == {"fsdp"}


def test_tensor_over_ib_is_slower_than_over_nvlink():
    hw = load_hardware("h100", devices=16)
    inner = estimate_analytic(CFG, WL, Strategy.parse("data=2,tensor=8"), hw)
    outer = estimate_analytic(CFG, WL, Strategy.parse("data=2,tensor=8,order=tensor.data"), hw)
    assert outer.placements["tensor"]["levels"] == ("ib",) or "ib" in outer.placements["tensor"]["levels"]
    assert outer.exposed_collective_s > inner.exposed_collective_s


def test_pipeline_bubble_formula():
    hw = load_hardware("h100", devices=32)
    for p, m in ((4, 8), (2, 2), (8, 32)):
        s = Strategy.parse(f"pipeline={p},fsdp={32 // p},microbatches={m}")
        flat = estimate_from_report(
            CFG, WL, s.replace(sizes={"fsdp": 32 // p}, microbatches=m), hw, _report(s)
        )
        e = estimate_from_report(CFG, WL, s, hw, _report(s))
        stage = flat.step_time_s
        assert e.pipeline_bubble_s / e.step_time_s == pytest.approx((p - 1) / (m + p - 1))
        assert e.step_time_s >= stage * (m + p - 1) / m
        p2p = e.collective_s["collective-permute"]
        assert e.step_time_s == pytest.approx(stage * (m + p - 1) / m + p2p)
        assert p2p > 0 and e.exposed_collective_s >= p2p


def test_fits_and_does_not_fit():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=8")
    cap = hw.memory_capacity_bytes
    ok = estimate_from_report(CFG, WL, s, hw, _report(s, peak=cap - 1))
    assert ok.fits and ok.memory_per_device_bytes == cap - 1 and ok.memory_capacity_bytes == cap
    assert ok.evidence == "gpu-aot"
    big = estimate_from_report(CFG, WL, s, hw, _report(s, peak=cap + 1))
    assert not big.fits and any(r.startswith("does not fit") for r in big.reasons)
    oom = estimate_from_report(
        CFG,
        WL,
        s,
        hw,
        _report(s, outcome="oom", flops=0, oom_required_bytes=131e9, message="CompileTimeHbmOom"),
    )
    assert not oom.fits and oom.memory_per_device_bytes == int(131e9)
    assert oom.step_time_s > 0  # timed by the analytic model
    assert any("does not fit: 122 GiB" in r for r in oom.reasons)  # 131e9 bytes


def test_cpu_compile_of_gpu_hardware_uses_analytic_memory():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=8")
    e = estimate_from_report(CFG, WL, s, hw, _report(s, target="cpu", peak=1))
    assert e.evidence == "cpu-compile+analytic-memory"
    assert e.memory_per_device_bytes == int(analytic_memory(CFG, WL, s).total)
    assert any("analytic model" in r for r in e.reasons)
    cpu = estimate_from_report(
        CFG, WL, s, load_hardware("cpu", devices=8), _report(s, target="cpu", peak=123)
    )
    assert cpu.evidence == "cpu-compile" and cpu.memory_per_device_bytes == 123


def test_failed_compile_falls_back_to_analytic():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=8")
    e = estimate_from_report(CFG, WL, s, hw, _report(s, outcome="error", flops=0, message="boom"))
    a = estimate_analytic(CFG, WL, s, hw)
    assert e.evidence == "analytic" and e.step_time_s == pytest.approx(a.step_time_s)


def test_per_kind_overlap_model_without_a_schedule():
    """No schedule read: FSDP gathers hide behind all but one layer's compute; tensor all-reduces and
    all-to-alls are exposed; each row says which assumption priced it."""
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=4,tensor=2")
    coll = {"bytes": 2**30, "group_size": 4, "count": 10, "dtype": "bf16"}
    fsdp = estimate_from_report(
        CFG, WL, s, hw, _report(s, colls=[Collective("all-gather", mesh_axes=("fsdp",), **coll)])
    )
    t = collective_time_on_axes("all-gather", 2**30, ("fsdp",), assign_levels(s.mesh, hw)) * 10
    room = fsdp.busy_s * (1 - 1 / CFG.layers)
    assert fsdp.collective_s["all-gather"] == pytest.approx(t)
    assert fsdp.exposed_collective_s == pytest.approx(t - min(room, t * (1 - 1 / CFG.layers)))
    assert fsdp.overlap["fsdp all-gather"]["source"] == "fsdp-gather"
    tensor = estimate_from_report(
        CFG, WL, s, hw, _report(s, colls=[Collective("all-reduce", 2**30, 2, ("tensor",), 10, "bf16")])
    )
    assert tensor.exposed_collective_s == pytest.approx(tensor.collective_s["all-reduce"])
    a2a = estimate_from_report(
        CFG, WL, s, hw, _report(s, colls=[Collective("all-to-all", mesh_axes=("fsdp",), **coll)])
    )
    assert a2a.exposed_collective_s == pytest.approx(a2a.collective_s["all-to-all"])


def test_collective_matmul_flag_hides_tensor_gathers_up_to_the_matmuls():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=4,tensor=2")
    ag = [Collective("all-gather", 2**24, 2, ("tensor",), 10, "bf16")]
    off = estimate_from_report(CFG, WL, s, hw, _report(s, colls=ag))
    on = estimate_from_report(
        CFG, WL, s, hw, _report(s, colls=ag, xla_flags={"xla_gpu_threshold_for_windowed_einsum_mib": "0"})
    )
    assert off.exposed_collective_s == pytest.approx(off.collective_s["all-gather"])
    assert on.exposed_collective_s == pytest.approx(max(0.0, on.collective_s["all-gather"] - on.compute_s))
    assert on.overlap["tensor all-gather"]["source"] == "tensor-cm"


def test_schedule_overlap_hides_async_collectives_up_to_their_window():
    """A scheduled report: an async collective hides up to the compute between its start and done
    (timed with the step's roofline); a synchronous one is exposed whatever the model would say."""
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=8")
    t1 = collective_time_on_axes("all-gather", 2**26, ("fsdp",), assign_levels(s.mesh, hw))
    peak = hw.peak_flops["bf16"]

    def est(async_count, window_flops):
        row = Collective(
            "all-gather",
            2**26,
            8,
            ("fsdp",),
            4,
            "bf16",
            async_count,
            OverlapWindow(matmul_flops=window_flops),
        )
        return estimate_from_report(CFG, WL, s, hw, _report(s, colls=[row], overlap_from_schedule=True))

    sync = est(0, 0.0)
    assert sync.exposed_collective_s == pytest.approx(4 * t1)
    assert sync.overlap["fsdp all-gather"] == {
        "s": pytest.approx(4 * t1),
        "hidden": 0.0,
        "source": "schedule",
    }
    roomy = est(4, 1e3 * peak)  # far more compute in the window than the gather needs
    assert roomy.exposed_collective_s == pytest.approx(0.0)
    half = est(2, 1e3 * peak)  # half the occurrences async
    assert half.exposed_collective_s == pytest.approx(2 * t1)
    tight = est(4, 2 * t1 * peak * 0.5)  # a window of about t1 at 50% efficiency or better
    assert 0 < tight.exposed_collective_s < 4 * t1


def test_reduced_data_axis_is_scaled_back():
    hw = load_hardware("h100", devices=64)
    s = Strategy.parse("data=8,fsdp=8")
    small = tuple((a, 2 if a == "data" else n) for a, n in s.mesh)
    rep = dataclasses.replace(
        _report(s, colls=[Collective("all-reduce", 2**28, 2, ("data",), 1, "f32")]), mesh=small
    )
    e = estimate_from_report(CFG, WL, s, hw, rep)
    full = collective_time_on_axes("all-reduce", 2**28, ("data",), assign_levels(s.mesh, hw))
    assert e.collective_s["all-reduce"] == pytest.approx(full)
    assert any("compiled data=2 of 8" in r for r in e.reasons)


def test_mfu_tokens_and_json_shape():
    hw = load_hardware("tpu-v5p", devices=64)
    s = Strategy.parse("fsdp=16,tensor=4")
    e = estimate_analytic(CFG, WL, s, hw)
    assert isinstance(e, Estimate) and e.evidence == "analytic"
    # MFU from first principles, written out for llama3-8b (not the implementation's own formula):
    # 6 x matmul params per token (q, o: d x d; k, v: d x 1024; SwiGLU: 3 x d x 14336; LM head: d x V;
    # the two norm scales are params too) + 3 x causal attention (QK^T and PV: 2 x 2 x d x S/2 a layer).
    d, layers, v, s, b = 4096, 32, 128256, 2048, 64
    n_matmul = layers * (2 * d * d + 2 * d * 1024 + 3 * d * 14336 + 2 * d) + d * v + d
    flops_per_token = 6 * n_matmul + 3 * layers * 2 * 2 * d * (s / 2)
    assert hw.peak_flops["bf16"] == 459e12  # TPU v5p datasheet
    assert e.mfu == pytest.approx(flops_per_token * b * s / (e.step_time_s * 64 * 459e12), rel=1e-6)
    assert e.tokens_per_s == pytest.approx(b * s / e.step_time_s)
    assert 0 < e.mfu < 1
    j = e.to_json()
    for k in (
        "strategy",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "memory_per_device_bytes",
        "memory_capacity_bytes",
        "fits",
        "breakdown",
        "evidence",
        "reasons",
        "placements",
    ):
        assert k in j
    for k in ("compute_s", "memory_s", "collective_s", "exposed_collective_s", "pipeline_bubble_s"):
        assert k in j["breakdown"]
    assert set(j["breakdown"]["collective_s"]) <= {
        "all-gather",
        "reduce-scatter",
        "all-reduce",
        "all-to-all",
        "collective-permute",
    }
    hash(e)  # frozen and hashable


def test_fp8_workload_uses_fp8_peak():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("fsdp=8")
    rep = analytic_report(CFG, WL, s, platform="gpu")
    bf16 = estimate_from_report(CFG, WL, s, hw, rep)
    fp8 = estimate_from_report(CFG, dataclasses.replace(WL, dtype="float8_e4m3fn"), s, hw, rep)
    assert fp8.compute_s < bf16.compute_s


def test_compile_without_readable_hlo_keeps_compiler_memory_and_times_analytically():
    """libtpu can compile a step whose HLO text it then fails to print; the memory analysis still counts."""
    from codesign.compile.targets import _memory_only_report
    from codesign.config import Workload
    from codesign.cost.estimate import estimate_from_report
    from codesign.hardware import load_hardware
    from codesign.presets import get_preset
    from codesign.report import CompileReport
    from codesign.sharding.strategy import Strategy

    class FakeCompiled:
        def cost_analysis(self):
            return {"flops": 1.0e12}

        def memory_analysis(self):
            class M:
                argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = (
                    40 << 30,
                    40 << 30,
                    40 << 30,
                )
                temp_size_in_bytes, generated_code_size_in_bytes = 20 << 30, 0

            return M()

    hw = load_hardware("tpu-v5p", devices=256)
    report = _memory_only_report(
        FakeCompiled(),
        hw,
        "tpu",
        12.0,
        RuntimeError("RET_CHECK async-update"),
        [],
        {"target": "tpu", "mesh": (("fsdp", 256),)},
    )
    assert report.ok and not report.hlo_analyzed and report.memory.peak == 60 << 30
    report = CompileReport.from_json(report.to_json())  # survives the cache
    assert not report.hlo_analyzed
    est = estimate_from_report(
        get_preset("llama3.1-70b"), Workload(512, 4096), Strategy.parse("fsdp=256"), hw, report
    )
    assert est.memory_per_device_bytes == 60 << 30 and est.fits
    assert est.evidence == "tpu-aot-memory+analytic-time" and est.step_time_s > 0


def test_memory_bound_kernels_add_to_matmul_kernels():
    """Kernels run one after another: HBM traffic outside the matmuls is not hidden behind them."""
    hw = load_hardware("h100", devices=1)
    s = Strategy.parse("data=1")
    split = dataclasses.replace(_report(s, flops=1e15), bytes_accessed=3e12, matmul_bytes=1e12)
    e = estimate_from_report(CFG, WL, s, hw, split)
    rate = hw.chip.hbm_bytes_per_s * hw.efficiency.hbm
    assert e.memory_s == pytest.approx(2e12 / rate)
    assert e.compute_s >= 1e12 / rate
    assert e.step_time_s == pytest.approx(e.compute_s + max(e.memory_s, e.vector_s))
    assert e.step_time_s > max(e.compute_s, e.memory_s)
    unsplit = estimate_from_report(CFG, WL, s, hw, dataclasses.replace(split, matmul_bytes=0.0))
    assert unsplit.memory_s == pytest.approx(3e12 / rate) and unsplit.step_time_s > e.step_time_s


def test_flash_attention_and_bf16_params_in_the_closed_form():
    """cuDNN flash attention skips the causal half and the S x S score traffic; bf16 master weights
    drop the casts and halve the optimizer's traffic. Long sequences make the difference large."""
    cfg, s = get_preset("tiny-dense"), Strategy.parse("data=1,remat=none")
    w = Workload(global_batch=4, seq_len=4096)
    xla = analytic_report(cfg, w, s, platform="gpu")
    flash = analytic_report(cfg, dataclasses.replace(w, attention="cudnn"), s, platform="gpu")
    assert flash.matmul_flops < xla.matmul_flops
    assert flash.bytes_accessed - flash.matmul_bytes < 0.5 * (xla.bytes_accessed - xla.matmul_bytes)
    bf16 = analytic_report(cfg, dataclasses.replace(w, param_dtype="bfloat16"), s, platform="gpu")
    assert bf16.bytes_accessed < xla.bytes_accessed and bf16.matmul_flops == xla.matmul_flops
    hw = load_hardware("h200", devices=1)
    assert (
        estimate_analytic(cfg, dataclasses.replace(w, attention="cudnn"), s, hw).step_time_s
        < estimate_analytic(cfg, w, s, hw).step_time_s
    )


def test_unknown_attention_implementation_is_refused():
    from codesign.config import ConfigError

    with pytest.raises(ConfigError, match="attention implementation 'flash'"):
        Workload(attention="flash")

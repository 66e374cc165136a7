"""Compile targets: layout signatures on 8 emulated CPU devices, loop-aware FLOPs against closed forms
and XLA, deviceless TPU compiles (ok and OOM), failures as data, the subprocess worker, GPU AOT."""

import json
import os
import stat
import sys

import pytest

from codesign import arithmetic as ar
from codesign.compile import devices as D
from codesign.compile.measure import measure
from codesign.compile.targets import compile_candidate, parse_oom, plan_compile, resolve_target
from codesign.compile.worker import CompileRequest, compile_in_subprocess
from codesign.config import Workload
from codesign.hardware.catalog import load_hardware
from codesign.presets import get_preset
from codesign.report import CompileReport
from codesign.sharding.strategy import Strategy, StrategyError
from tests.conftest import require_devices

W = Workload(global_batch=8, seq_len=32)
HW8 = load_hardware("tpu-v5e", 8)  # any hardware: the cpu target only takes its memory capacity


def _compile(model, spec, cfg=None, workload=W, hw=HW8, target="cpu", **kw) -> CompileReport:
    cfg = cfg or get_preset(model)
    r = compile_candidate(cfg, workload, Strategy.parse(spec), hw, target, **kw)
    assert r.outcome == "ok", f"{spec}: {r.outcome} at {r.stage}: {r.message}"
    return r


def _bytes(r: CompileReport, kind: str, axes=None) -> int:
    return sum(
        c.bytes * c.count for c in r.collectives if c.kind == kind and (axes is None or c.mesh_axes == axes)
    )


def _axes(r: CompileReport) -> set:
    return {c.mesh_axes for c in r.collectives}


# ---------------------------------------------------------------------------------------------- CPU layouts


@pytest.fixture(scope="module")
def data8():
    require_devices(8)
    return _compile("tiny-dense", "data=8")


@pytest.fixture(scope="module")
def fsdp8():
    require_devices(8)
    return _compile("tiny-dense", "fsdp=8")


def test_data_parallel_all_reduces_the_gradients(data8):
    grad_bytes = ar.param_counts(get_preset("tiny-dense")).total * 4  # f32 master params
    assert _axes(data8) == {("data",)}
    assert {c.kind for c in data8.collectives} == {"all-reduce"}
    assert _bytes(data8, "all-reduce", ("data",)) == pytest.approx(grad_bytes, rel=0.10)
    assert data8.evidence == "cpu-compile" and data8.memory.capacity == HW8.memory_capacity_bytes
    m = data8.memory
    assert m.peak == m.argument + m.output - m.alias + m.temp
    # params + Adam mu/nu, f32, replicated: 12 bytes per param (+ the batch)
    assert m.argument == pytest.approx(12 * ar.param_counts(get_preset("tiny-dense")).total, rel=0.02)
    assert data8.versions["jax"] and data8.hlo_bytes > 0 and data8.compile_s > 0
    assert any("trip counts" in n for n in data8.notes)
    assert not any("NOT explained" in n for n in data8.notes)


def test_fsdp_gathers_params_and_shards_state(fsdp8, data8):
    assert _axes(fsdp8) == {("fsdp",)}
    assert _bytes(fsdp8, "all-gather", ("fsdp",)) > 0
    # XLA:CPU has no reduce-scatter pass: gradients reduce with all-reduce over fsdp there (on TPU they
    # become reduce-scatters, see test_tpu_v5e_deviceless_compile).
    assert _bytes(fsdp8, "reduce-scatter") + _bytes(fsdp8, "all-reduce", ("fsdp",)) > 0
    # data=8 holds a full replica per device, i.e. the single-device argument bytes
    assert fsdp8.memory.argument == pytest.approx(data8.memory.argument / 8, rel=0.05)


def test_tensor_parallel_collectives_stay_on_the_tensor_axis():
    require_devices(8)
    r = _compile(None, "tensor=8", cfg=get_preset("tiny-dense").replace(kv_heads=8))
    assert r.collectives and _axes(r) == {("tensor",)}


def test_moe_expert_parallel_dispatch_is_an_all_to_all():
    require_devices(8)
    r = _compile("tiny-moe", "expert=8")
    a2a = [c for c in r.collectives if c.kind == "all-to-all"]
    assert a2a and all(c.mesh_axes == ("expert",) and c.group_size == 8 for c in a2a)
    # dispatch + combine, forward and backward, in each of the 2 MoE layers (scanned)
    assert sum(c.count for c in a2a) >= 8
    assert _axes(r) == {("expert",)}


# ---------------------------------------------------------------------------------------------- FLOPs


@pytest.fixture(scope="module")
def flops_by_layers():
    return {
        L: _compile(None, "data=1,remat=none", cfg=get_preset("tiny-dense").replace(layers=L)) for L in (1, 2)
    }


def test_replicated_compile_has_no_collectives(flops_by_layers):
    for r in flops_by_layers.values():
        assert r.collectives == ()
        assert dict(r.mesh)["data"] == 1


def test_loop_aware_flops_scale_per_layer_and_match_xla_without_loops(flops_by_layers):
    one, two = flops_by_layers[1], flops_by_layers[2]
    cfg1 = get_preset("tiny-dense").replace(layers=1)
    # XLA drops a 1-trip loop, so its flat count is the whole step: the HLO walk must agree with it.
    assert one.while_loops == ()
    assert one.flops == pytest.approx(one.xla_cost_analysis["flops"], rel=0.05)
    # The scanned 2-layer step (2 loops, 2 trips each) adds exactly one layer's closed-form FLOPs.
    assert sorted(n for _, n, _ in two.while_loops) == [2, 2]
    layer = (
        ar.train_flops_per_token(get_preset("tiny-dense"), W.seq_len, causal=False)
        - ar.train_flops_per_token(cfg1, W.seq_len, causal=False)
    ) * W.tokens
    assert two.matmul_flops - one.matmul_flops == pytest.approx(layer, rel=0.02)
    # XLA counts the loop body once; the walk does not.
    assert two.xla_cost_analysis["flops"] < 0.8 * two.flops


def test_dense_flops_match_the_closed_form(flops_by_layers):
    cfg = get_preset("tiny-dense")
    r = flops_by_layers[2]
    # dot_product_attention computes the full masked T x T scores: non-causal attention FLOPs.
    expected = ar.train_flops_per_token(cfg, W.seq_len, causal=False) * W.tokens
    assert r.matmul_flops == pytest.approx(expected, rel=0.10)
    assert r.flops >= r.matmul_flops
    assert 6 * ar.matmul_params_per_token(cfg) * W.tokens < r.matmul_flops


# ---------------------------------------------------------------------------------------------- failures


def test_malformed_strategy_names_the_problem():
    with pytest.raises(StrategyError, match="unknown strategy key 'tensr'"):
        Strategy.parse("tensr=8")
    with pytest.raises(StrategyError, match="must be an integer"):
        Strategy.parse("data=two")


def test_non_dividing_strategy_is_a_build_error():
    require_devices(8)
    # tiny-dense has kv_heads=4: 8-way tensor parallelism cannot split them
    r = compile_candidate(get_preset("tiny-dense"), W, Strategy.parse("tensor=8"), HW8, "cpu")
    assert r.outcome == "error" and r.stage == "build"
    assert "kv_heads" in r.message and "RulesError" in r.message
    r = compile_candidate(
        get_preset("tiny-dense"), Workload(global_batch=4, seq_len=32), Strategy.parse("data=8"), HW8, "cpu"
    )
    assert r.outcome == "error" and r.stage == "build" and "not divisible" in r.message


def test_cpu_target_without_enough_devices_points_to_the_worker():
    r = compile_candidate(
        get_preset("tiny-dense"),
        Workload(global_batch=16, seq_len=32),
        Strategy.parse("data=16"),
        load_hardware("tpu-v5e", 16),
        "cpu",
    )
    assert r.outcome == "error" and r.stage == "build"
    assert "compile_in_subprocess" in r.message and "--devices 16" in r.message


def test_parse_oom_formats():
    msg = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
        "for HLO temporaries (23.61G) exceeds available HBM (15.75G). HLO module: jit__step."
    )
    assert parse_oom(msg) == (round(23.61 * 2**30), round(15.75 * 2**30))
    assert parse_oom(
        "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.25G of 15.48G hbm."
    ) == (round(20.25 * 2**30), round(15.48 * 2**30))
    assert parse_oom("INVALID_ARGUMENT: bad sharding") is None


# ---------------------------------------------------------------------------------------------- planning


def test_pipeline_compiles_the_whole_pipelined_step():
    moe = get_preset("deepseek-v3")  # 3 dense + 58 MoE layers
    s = Strategy.parse("pipeline=4,expert=8,microbatches=8,v=2")
    plan = plan_compile(moe, W, s, "tpu", load_hardware("tpu-v5p", 32))
    assert plan.cfg == moe and plan.strategy == s and plan.n_devices == 32 and plan.pipeline_stages == 4
    assert plan.workload.global_batch == W.global_batch
    assert any("whole pipelined step" in n and "19 ticks of which 3 fill/drain" in n for n in plan.notes)
    # The reduced-mesh rule shrinks data replicas, never stages.
    wl = Workload(global_batch=1024, seq_len=32)
    s = Strategy.parse("pipeline=4,data=64,fsdp=4,microbatches=4")
    plan = plan_compile(get_preset("tiny-dense"), wl, s, "cpu", max_compile_devices=256)
    assert plan.strategy.size("pipeline") == 4 and plan.data_scale == 4 and plan.n_devices == 256


def test_large_mesh_shrinks_the_data_axis():
    wl = Workload(global_batch=1024, seq_len=32)
    plan = plan_compile(
        get_preset("tiny-dense"), wl, Strategy.parse("data=64,fsdp=16"), "cpu", max_compile_devices=256
    )
    assert plan.data_scale == 4 and plan.strategy.sizes["data"] == 16 and plan.n_devices == 256
    assert plan.workload.global_batch == 256 and dict(plan.full_mesh)["data"] == 64
    assert any("reduced-mesh: data_scale=4 full_mesh=data=64,fsdp=16" in n for n in plan.notes)
    with pytest.raises(D.TargetError, match="max_compile_devices"):
        plan_compile(get_preset("tiny-dense"), wl, Strategy.parse("fsdp=1024"), "cpu")


def test_resolve_target():
    assert resolve_target("cpu", HW8) == "cpu"
    assert resolve_target("auto", HW8) == ("tpu" if D.libtpu_available() else "cpu")
    h100 = load_hardware("h100", 8)
    assert resolve_target("auto", h100) == ("gpu" if D.gpu_aot_available() else "cpu")
    with pytest.raises(D.TargetError, match="unknown compile target"):
        resolve_target("quantum", HW8)


# ---------------------------------------------------------------------------------------------- TPU

tpu = pytest.mark.skipif(not D.libtpu_available(), reason="libtpu is not installed (pip install -e '.[dev]')")


@pytest.mark.tpu
@tpu
def test_tpu_v5e_deviceless_compile():
    r = _compile("tiny-dense", "fsdp=4,tensor=2", hw=HW8, target="tpu")
    assert r.evidence == "tpu-aot"
    assert r.memory.capacity == HW8.memory_capacity_bytes and 0 < r.memory.peak < r.memory.capacity
    assert r.versions.get("libtpu")
    assert _bytes(r, "reduce-scatter", ("fsdp",)) > 0  # FSDP gradients, unlike XLA:CPU
    assert _bytes(r, "all-reduce", ("tensor",)) > 0
    assert r.xla_cost_analysis and r.xla_cost_analysis["flops"] > 0


@pytest.mark.tpu
@tpu
def test_tpu_v5p_deviceless_compile():
    hw = load_hardware("tpu-v5p", 8)
    r = _compile("tiny-dense", "fsdp=8", hw=hw, target="tpu")
    assert r.evidence == "tpu-aot" and r.memory.capacity == hw.memory_capacity_bytes
    assert _axes(r) == {("fsdp",)}


@pytest.mark.tpu
@tpu
def test_tpu_oom_fast():
    wide = get_preset("tiny-dense").replace(
        name="wide", hidden=8192, heads=64, kv_heads=8, head_dim=128, mlp_dim=65536, layers=1
    )
    r = compile_candidate(wide, W, Strategy.parse("data=8"), HW8, "tpu")
    assert r.outcome == "oom", r.message
    assert r.oom_required_bytes > r.oom_available_bytes > 0
    assert r.oom_available_bytes == pytest.approx(HW8.memory_capacity_bytes, rel=0.01)
    assert "CompileTimeHbmOom" in r.message and r.stage == "compile"


@pytest.mark.tpu
@tpu
def test_tpu_oom_llama3_8b_on_8_v5e():
    r = compile_candidate(
        get_preset("llama3-8b"), Workload(global_batch=8, seq_len=2048), Strategy.parse("data=8"), HW8, "tpu"
    )
    assert r.outcome == "oom", r.message
    assert r.oom_required_bytes > 100 * 2**30 and r.oom_available_bytes > 0


# ---------------------------------------------------------------------------------------------- GPU


def test_gpu_target_without_the_compiler_says_how_to_install():
    if D.gpu_aot_available():
        pytest.skip("the gpu-aot compiler is installed")
    r = compile_candidate(
        get_preset("tiny-dense"), W, Strategy.parse("data=8"), load_hardware("h100", 8), "gpu"
    )
    assert r.outcome == "error" and r.stage == "build" and 'pip install -e ".[gpu-aot]"' in r.message


@pytest.mark.gpu_aot
def test_gpu_deviceless_compile():
    if not D.gpu_aot_available():
        pytest.skip(
            'needs the deviceless CUDA compiler (jax_cuda12_plugin / jax_cuda13_plugin): pip install -e ".[gpu-aot]"'
        )
    hw = load_hardware("h100", 8)
    r = compile_in_subprocess(get_preset("tiny-dense"), W, Strategy.parse("fsdp=8"), hw, "gpu", timeout_s=300)
    assert r.outcome == "ok", r.message
    assert r.evidence == "gpu-aot" and r.memory.capacity == hw.memory_capacity_bytes


def test_gpu_target_configs_ship_for_the_catalog_chips():
    for name in ("a100", "h100", "h200", "b200"):
        hw = load_hardware(name, 8)
        text = D.gpu_target_config_text(hw)
        assert "gpu_device_info" in text and 'platform_name: "CUDA"' in text
        size = int(
            next(ln.split(":")[1] for ln in text.splitlines() if ln.strip().startswith("device_memory_size"))
        )
        assert size == hw.hbm_bytes
    assert D.gpu_topology_string(16) == "1x2x8" and D.gpu_topology_string(4) == "1x1x4"


# ---------------------------------------------------------------------------------------------- worker


def test_worker_compiles_with_its_own_device_count():
    req = CompileRequest(
        get_preset("tiny-dense"), W, Strategy.parse("fsdp=2,tensor=2"), load_hardware("tpu-v5e", 4), "cpu"
    )
    assert CompileRequest.from_json(json.loads(json.dumps(req.to_json()))) == req
    r = compile_in_subprocess(req.cfg, req.workload, req.strategy, req.hardware, "cpu", timeout_s=240)
    assert r.outcome == "ok", r.message
    assert dict(r.mesh)["fsdp"] == 2 and _axes(r) <= {("fsdp",), ("tensor",), ("fsdp", "tensor")}


def test_worker_timeout_and_crash(tmp_path, monkeypatch):
    cfg, s, hw = get_preset("tiny-dense"), Strategy.parse("data=4"), load_hardware("tpu-v5e", 4)
    r = compile_in_subprocess(cfg, W, s, hw, "cpu", timeout_s=0.5)
    assert r.outcome == "timeout" and "0.5 s" in r.message
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'F0000 fatal: something broke' >&2\nkill -SEGV $$\n")
    crash.chmod(crash.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(crash))
    r = compile_in_subprocess(cfg, W, s, hw, "cpu", timeout_s=30)
    assert r.outcome == "error" and "SIGSEGV" in r.message and "something broke" in r.message
    seen = []
    out = measure(
        [CompileRequest(cfg, W, s, hw, "cpu")] * 2,
        workers=2,
        timeout_s=30,
        progress=lambda i, rep: seen.append(i),
    )
    assert [x.outcome for x in out] == ["error", "error"] and sorted(seen) == [0, 1]
    assert os.path.exists(str(crash))


@pytest.mark.slow  # a 70B-wide compile on the CPU stand-in
def test_cpu_compile_for_gpu_hardware_prices_accelerator_collectives():
    """XLA:CPU moves f32 gradients by all-reduce; a GPU moves bf16 by reduce-scatter. A CPU compile of
    GPU hardware is priced with the closed form's GPU collectives and cross-checked against them."""
    from codesign.closed_form import analytic_report
    from codesign.cost.estimate import estimate_analytic, estimate_from_report

    cfg, s = get_preset("tiny-dense"), Strategy.parse("fsdp=8")
    rep = _compile("tiny-dense", "fsdp=8")
    gpu = load_hardware("h100", devices=8)
    e = estimate_from_report(cfg, W, s, gpu, rep)
    assert dict(e.collective_s) == pytest.approx(dict(estimate_analytic(cfg, W, s, gpu).collective_s))
    compiled = sum(c.bytes * c.count for c in rep.collectives)
    accel = sum(c.bytes * c.count for c in analytic_report(cfg, W, s, platform="gpu").collectives)
    assert compiled > 1.5 * accel  # what the CPU lowering would have charged the GPU
    line = next(r for r in e.reasons if r.startswith("compiled collectives"))
    assert 0.85 <= float(line.split("x")[0].split()[-1]) <= 1.15 and "outside" not in line
    native = estimate_from_report(cfg, W, s, load_hardware("cpu", devices=8), rep)  # cpu on cpu: as compiled
    assert not any(r.startswith("compiled collectives") for r in native.reasons)

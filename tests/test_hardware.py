"""The hardware catalog: sources on every number, JSON round trips, sizing for a device count, TPU slices."""

import json

import pytest
import yaml

from codesign.hardware import (
    Hardware,
    HardwareError,
    TopologyError,
    hardware_names,
    list_hardware,
    load_hardware,
    tpu_slice,
    tpu_topology_name,
    valid_slice_sizes,
)

SYSTEMS = [
    "a100",
    "h100",
    "h200",
    "h800",
    "b200",
    "gb200-nvl72",
    "tpu-v4",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
    "cpu",
]


def test_catalog_names_and_json_shape():
    names = hardware_names()
    assert all(s in names for s in SYSTEMS)
    assert len(names) == len(set(names))
    for hw in list_hardware():
        d = json.loads(json.dumps(hw.to_json()))
        for key in ("name", "kind", "peak_flops", "hbm_bytes", "hbm_bytes_per_s", "levels", "sources"):
            assert key in d, (hw.name, key)
        for lv in d["levels"]:
            assert {"name", "group_size", "bytes_per_s", "latency_s"} <= set(lv)
        assert d["kind"] in ("chip", "system")
        assert d["kind"] == "system" or d["levels"] == []


def test_every_number_has_a_source():
    for hw in list_hardware():
        for field in ("peak_flops", "hbm_bytes", "hbm_bytes_per_s", "efficiency", "memory_reserve_bytes"):
            assert hw.sources.get(field), (hw.name, field)
        for lv in hw.levels:
            assert lv.source and hw.sources[f"levels.{lv.name}"] == lv.source
        assert hw.efficiency.source


def test_json_round_trip_and_hashable():
    for name in SYSTEMS:
        for devices in (None, 8):
            hw = load_hardware(name, devices=devices)
            again = Hardware.from_json(json.loads(json.dumps(hw.to_json())))
            assert again == hw
            assert hash(again) == hash(hw)


def test_profile_yaml_path(tmp_path):
    hw = load_hardware("h100", devices=16)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(hw.to_json()))
    assert load_hardware(str(path)) == hw
    assert load_hardware(path, devices=32).level("ib").group_size == 32


def test_unknown_name_lists_names_and_mentions_yaml():
    with pytest.raises(HardwareError) as e:
        load_hardware("h1000")
    msg = str(e.value)
    assert "tpu-v5p" in msg and "gb200-nvl72" in msg and "YAML" in msg
    assert isinstance(e.value, ValueError)


def test_chip_peaks():
    h100 = load_hardware("h100")
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12, rel=1e-3)
    assert h100.peak_flops["fp8"] == pytest.approx(2 * h100.peak_flops["bf16"], rel=1e-3)
    assert load_hardware("h200").hbm_bytes > 140 * 2**30
    for tpu in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e"):
        assert "fp8" not in load_hardware(tpu).peak_flops  # none of these has an fp8 MXU mode
    assert "fp8" not in load_hardware("a100").peak_flops
    assert load_hardware("tpu-v5p").peak_flops["bf16"] == 4.59e14
    chip = load_hardware("h100-sxm")
    assert chip.kind == "chip" and chip.levels == ()
    with pytest.raises(HardwareError, match="single chip"):
        load_hardware("h100-sxm", devices=8)


def test_v5p_critical_intensity_matches_scaling_book():
    # scaling book: C / W_ici = 4.59e14 / 1.8e11 = 2550 for TPU v5p (bidirectional ICI bandwidth)
    assert load_hardware("tpu-v5p").critical_intensity("bf16") == pytest.approx(2550, rel=0.01)
    assert load_hardware("tpu-v5p", devices=256).critical_intensity("bf16", "ici") == pytest.approx(
        2550, rel=0.01
    )
    # H100 over NVLink: 989e12 / 450e9 ~ 2200
    assert load_hardware("h100").critical_intensity("bf16", "nvlink") == pytest.approx(2199, rel=0.01)
    with pytest.raises(HardwareError):
        load_hardware("tpu-v5p").critical_intensity("fp8")


def test_gpu_sizing():
    h100 = load_hardware("h100", devices=16)
    assert [(lv.name, lv.group_size) for lv in h100.levels] == [("nvlink", 8), ("ib", 16)]
    assert h100.level("nvlink").bytes_per_s == 450e9 and h100.level("ib").bytes_per_s == 50e9
    assert load_hardware("h100", devices=4).level("nvlink").group_size == 4
    nvl = load_hardware("gb200-nvl72", devices=144)
    assert [(lv.name, lv.group_size) for lv in nvl.levels] == [("nvlink", 72), ("ib", 144)]
    assert load_hardware("h800").level("nvlink").bytes_per_s == 160e9
    assert load_hardware("a100").level("ib").bytes_per_s == 25e9


def test_tpu_sizing_from_slice():
    v5p = load_hardware("tpu-v5p", devices=256)
    ici = v5p.level("ici")
    assert ici.torus_dims == (8, 8, 4) and ici.wraps == (True, True, True) and ici.group_size == 256
    v5e = load_hardware("tpu-v5e", devices=512)  # two 16x16 slices over DCN
    assert v5e.level("ici").group_size == 256 and v5e.level("dcn").group_size == 512
    with pytest.raises(HardwareError, match="nearby valid counts"):
        load_hardware("tpu-v5p", devices=100)


def test_memory_reserve():
    v5p = load_hardware("tpu-v5p")
    # libtpu reports 95.73 GiB available on a v5p chip
    assert v5p.memory_capacity_bytes == pytest.approx(95.73 * 2**30, rel=1e-4)
    h100 = load_hardware("h100")
    assert 0 < h100.memory_reserve_bytes < 0.1 * h100.hbm_bytes


def test_efficiency_from_h200_probe():
    eff = load_hardware("h200").efficiency
    assert "h200_probe.jsonl" in eff.source
    assert eff.matmul_fraction("bf16", 8192) == pytest.approx(794.8 / 989.4, rel=0.01)
    assert eff.matmul_fraction("bf16", 1 << 20) == pytest.approx(663.0 / 989.4, rel=0.01)  # clamped
    assert eff.matmul_fraction("bf16", 6000) == pytest.approx((0.760 + 0.803) / 2, abs=0.01)  # log2 interp
    assert eff.matmul_fraction("fp8", 8192) == pytest.approx(954.6 / 1978.9, rel=0.01)
    assert eff.matmul_fraction("int8", 8192) == eff.matmul_fraction("bf16", 8192)  # falls back to bf16
    assert eff.hbm == pytest.approx(4267.8 / 4800, rel=0.01)
    assert "assumption" in load_hardware("tpu-v5p").efficiency.source


@pytest.mark.parametrize(
    "gen,n,name,wraps",
    [
        ("v5p", 256, "v5p:8x8x4", (True, True, True)),
        ("v5p", 64, "v5p:4x4x4", (True, True, True)),
        ("v5p", 16, "v5p:4x2x2", (False, False, False)),  # below a full cube: no optical wraparound
        ("v5p", 8960, "v5p:28x20x16", (True, True, True)),
        ("v4", 64, "v4:4x4x4", (True, True, True)),
        ("v5e", 8, "v5e:2x4", (False, False)),
        ("v5e", 256, "v5e:16x16", (True, True)),
        ("v6e", 128, "v6e:8x16", (False, True)),  # only the full 16 dim wraps
    ],
)
def test_tpu_topology(gen, n, name, wraps):
    assert tpu_topology_name(gen, n) == name
    topo = tpu_slice(gen, n)
    assert topo.wraps == wraps and topo.n_chips == n


def test_tpu_topology_errors_name_nearby_counts():
    with pytest.raises(TopologyError, match="64, 128"):
        tpu_slice("v5p", 100)
    with pytest.raises(TopologyError, match="at most 256"):
        tpu_slice("v5e", 512)
    with pytest.raises(TopologyError, match="unknown TPU generation"):
        tpu_slice("v9", 8)
    assert max(valid_slice_sizes("v4")) == 4096 and max(valid_slice_sizes("v5p")) == 8960
    assert max(valid_slice_sizes("v6e")) == 256


def test_measured_efficiency_profiles_follow_their_citations():
    """Each catalog profile reproduces the raw numbers its source cites (measured / peak), and chips
    without a published microbenchmark say they are assumptions."""
    a100 = load_hardware("a100")
    assert a100.efficiency.matmul_fraction("bf16", 4096) == pytest.approx(271.2 / 312, abs=1e-3)
    assert "MAMF" in a100.efficiency.source and "GPUInspector" in a100.efficiency.source
    assert a100.efficiency.hbm == pytest.approx(1220.7 / 1448.4, abs=1e-3)
    # A100 runs fp16 and bf16 at the same 312 TFLOP/s on the same tensor-core path.
    assert a100.peak_flops["fp16"] == a100.peak_flops["bf16"] == 3.12e14
    assert a100.efficiency.matmul_fraction("fp16", 4096) == a100.efficiency.matmul_fraction("bf16", 4096)
    for name in ("h100", "h800"):
        eff = load_hardware(name).efficiency
        assert eff.matmul_fraction("fp8", 8192) == pytest.approx(1402.6 / 1979, abs=1e-3)
        assert eff.matmul_fraction("bf16", 8192) == pytest.approx(
            794.5 / 989, abs=2e-3
        )  # probe and MAMF agree
    v5e = load_hardware("tpu-v5e").efficiency
    assert v5e.matmul_fraction("bf16", 8192) == pytest.approx(0.923, abs=1e-3)
    assert v5e.matmul_fraction("bf16", 1024) == pytest.approx(0.0913, abs=1e-4)
    assert "matmul.ipynb" in v5e.source
    v6e = load_hardware("tpu-v6e").efficiency
    assert v6e.matmul_fraction("bf16", 8192) == pytest.approx(727.7 / 918, abs=1e-3)
    for name in ("tpu-v4", "tpu-v5p"):
        assert "assumption" in load_hardware(name).efficiency.source
    for name in ("tpu-v5e", "tpu-v6e"):  # measured matmul, assumed HBM: the source says which
        assert "HBM 0.85 and collective 0.8 are assumptions" in load_hardware(name).efficiency.source


def test_fp16_workload_uses_the_fp16_peak_and_table():
    """fp16 compute is priced at the chip's fp16 peak and an fp16 table when a profile has one (a
    calibrated GPU profile does), else at bf16's."""
    import dataclasses

    from codesign.config import Workload
    from codesign.cost.estimate import compute_dtype, estimate_analytic
    from codesign.presets import get_preset
    from codesign.sharding.strategy import Strategy

    assert compute_dtype(Workload(dtype="float16")) == "fp16"
    assert compute_dtype(Workload(dtype="bfloat16")) == "bf16"
    hw = load_hardware("a100", devices=8)
    cfg, s = get_preset("llama3-8b"), Strategy.parse("tensor=8")
    fp16 = estimate_analytic(cfg, Workload(8, 2048, dtype="float16"), s, hw)
    bf16 = estimate_analytic(cfg, Workload(8, 2048, dtype="bfloat16"), s, hw)
    assert fp16.compute_s == pytest.approx(bf16.compute_s)  # same peak, bf16's table
    table = dict(hw.efficiency.matmul)
    table["fp16"] = tuple((n, f / 2) for n, f in table["bf16"])
    slow = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, matmul=table))
    slower = estimate_analytic(cfg, Workload(8, 2048, dtype="float16"), s, slow)
    assert slower.compute_s == pytest.approx(2 * fp16.compute_s, rel=0.05)

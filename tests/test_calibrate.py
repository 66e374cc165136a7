"""`codesign calibrate` on the emulated CPU devices: quick, and its profile loads and plans."""

from __future__ import annotations

import jax
import yaml

from codesign.calibrate import closest_system, run_calibration
from codesign.config import Workload
from codesign.cost.estimate import estimate_analytic
from codesign.hardware import load_hardware
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy


def test_calibrate_on_cpu_writes_a_loadable_profile(tmp_path):
    path = tmp_path / "measured.yaml"
    result = run_calibration(str(path), quick=True)
    assert result["platform"] == "cpu" and result["devices"] == len(jax.devices())
    good = [r for r in result["matmul"] if "flops_per_s" in r]
    assert {r["dtype"] for r in good} == {"bf16", "fp32"} and all(r["flops_per_s"] > 0 for r in good)
    assert result["hbm_bytes_per_s"] > 0
    if len(jax.devices()) > 1:
        kinds = {r["kind"]: r for r in result["collectives"]}
        assert set(kinds) == {"all-gather", "reduce-scatter", "all-reduce", "all-to-all"}
        assert all(r.get("bytes_per_s", 0) > 0 for r in kinds.values()), kinds

    hw = load_hardware(str(path))
    assert hw.efficiency.source.startswith("measured by codesign calibrate on cpu")
    assert hw.sources["efficiency"] == hw.efficiency.source
    assert hw.devices == len(jax.devices()) and hw.platform == "cpu"
    assert [n for n, _ in hw.efficiency.matmul["bf16"]] == [128, 256, 512]
    assert 0 < hw.efficiency.hbm and 0 < hw.efficiency.collective
    sustained = result["sustained_matmul"]
    assert sustained["n"] == 512 and sustained["flops_per_s"] > 0
    assert (
        hw.efficiency.sustained == min(1.0, sustained["relative_to_table"])
        and 0 < hw.efficiency.sustained <= 1
    )
    with open(path) as f:
        assert "measurements" in yaml.safe_load(f)
    # The profile drives the cost model like a catalog entry does.
    e = estimate_analytic(
        get_preset("tiny-dense"),
        Workload(8, 32),
        Strategy.parse("fsdp=8"),
        load_hardware(str(path), devices=8),
    )
    assert e.step_time_s > 0


def test_closest_system():
    assert closest_system("NVIDIA H200", "gpu") == "h200"
    assert closest_system("NVIDIA H100 80GB HBM3", "gpu") == "h100"
    assert closest_system("TPU v5 lite", "tpu") == "tpu-v5e"
    assert closest_system("TPU v5p", "tpu") == "tpu-v5p"
    assert closest_system("cpu", "cpu") == "cpu"


def test_sustained_factor_scales_matmul_time(tmp_path):
    """A profile whose sustained matmul rate is half its short runs' doubles matmul-bound time."""
    import dataclasses

    import pytest

    from codesign.hardware.catalog import HardwareError

    hw = load_hardware("h200", devices=1)
    slow = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, sustained=0.5))
    args = (get_preset("llama3-8b"), Workload(8, 4096), Strategy.parse("data=1"))
    assert estimate_analytic(*args, slow).compute_s == pytest.approx(
        2 * estimate_analytic(*args, hw).compute_s
    )
    with pytest.raises(HardwareError, match="sustained"):
        dataclasses.replace(hw.efficiency, sustained=1.5)


def _fake_bench(platform: str, kind: str, devices: int, system: str, coll_eff: float):
    """A Bench whose 'measurements' follow known efficiencies of the catalog `system`: matmul
    0.3 -> 0.9 of each dtype's peak from n = 1024 to 8192, HBM 0.8, the all-gather at `coll_eff` of the
    cost model's time. A dtype the chip has no peak for fails, as a backend without it would."""
    import math

    from codesign.calibrate import Bench
    from codesign.cost.network import assign_levels, collective_time_on_axes

    hw = load_hardware(system)

    def frac(n):
        return 0.3 + 0.2 * math.log2(n / 1024)

    def matmul(n, dtype, reps, warmup_s=0.0, min_run_s=0.0, max_calls=200):
        if dtype not in hw.peak_flops:
            raise TypeError(f"{dtype} is not supported on {kind}")
        return 2 * n**3 / (hw.peak_flops[dtype] * frac(n))

    def hbm(nbytes, reps, warmup_s=0.0, min_run_s=0.0):
        return 0.8 * hw.chip.hbm_bytes_per_s

    def collectives(nbytes, reps, warmup_s=0.0, min_run_s=0.0):
        placements = assign_levels((("x", devices),), hw.with_devices(devices))
        t = collective_time_on_axes("all-gather", nbytes, ("x",), placements, efficiency=1.0) / coll_eff
        bw = (devices - 1) / devices * nbytes / t
        return [
            {
                "kind": "all-gather",
                "axis": "x",
                "devices": devices,
                "bytes": nbytes,
                "seconds": t,
                "bytes_per_s": bw,
            }
        ]

    return Bench(platform, kind, devices, matmul, hbm, collectives), frac


def test_calibrate_profile_shape_on_a_fake_tpu_and_gpu(tmp_path):
    """Without a TPU or GPU: calibrate's profile from fake measurements on a v5e-8 VM and an 8-GPU A100
    node is the catalog's shape (matmul by n per dtype, hbm, collective), loads back as that hardware,
    and prices a candidate with the measured fractions."""
    import pytest

    cases = [
        ("tpu", "TPU v5 lite", "tpu-v5e", {"bf16", "fp32"}, 0.7),
        ("gpu", "NVIDIA A100-SXM4-80GB", "a100", {"bf16", "fp16", "fp32"}, 0.9),
    ]
    for platform, kind, system, dtypes, coll_eff in cases:
        bench, frac = _fake_bench(platform, kind, 8, system, coll_eff)
        path = tmp_path / f"{system}.yaml"
        result = run_calibration(str(path), bench=bench)
        assert result["platform"] == platform and result["catalog_base"] == system
        if platform == "gpu":  # A100 has no fp8: an error row, and no fp8 table
            assert any(r["dtype"] == "fp8" and "error" in r for r in result["matmul"])
        else:  # TPUs are not asked for fp16/fp8 at all
            assert {r["dtype"] for r in result["matmul"]} == dtypes

        hw = load_hardware(str(path))
        assert hw.name == f"{system}-measured" and hw.platform == platform and hw.devices == 8
        assert set(hw.efficiency.matmul) == dtypes
        for dt in dtypes:
            assert [n for n, _ in hw.efficiency.matmul[dt]] == [1024, 2048, 4096, 8192]
            for n, f in hw.efficiency.matmul[dt]:
                assert f == pytest.approx(frac(n), abs=1e-3)
        assert hw.efficiency.hbm == pytest.approx(0.8)
        assert hw.efficiency.collective == pytest.approx(coll_eff, rel=1e-6)
        assert hw.efficiency.sustained == pytest.approx(1.0)
        if platform == "tpu":
            assert hw.tpu_generation == "v5e" and hw.levels[0].topology == "torus"
            assert hw.levels[0].torus_dims and hw.levels[0].group_size == 8
        # The profile drives the estimate: its matmul fraction at the candidate's size is the fake's.
        e = estimate_analytic(
            get_preset("tiny-dense"),
            Workload(8, 32),
            Strategy.parse("data=8"),
            load_hardware(str(path), devices=8),
        )
        assert e.step_time_s > 0 and e.fits

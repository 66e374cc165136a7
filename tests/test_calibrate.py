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

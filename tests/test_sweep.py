"""`explore sweep`: a small sweep finishes and writes its files; hardware-only points are re-costed."""

import itertools
import json

import pytest

from codesign.config import Workload
from codesign.explore import sweep as sw
from codesign.hardware import load_hardware
from codesign.presets import get_preset


def test_small_sweep_writes_files_and_bad_points_are_rows(tmp_path):
    hw = load_hardware("h100", devices=16)
    vary = sw.parse_vary(["scaleout_bw=12.5G,50G,200G", "attention=gqa,mla"])
    result = sw.run_sweep(get_preset("llama3-8b"), hw, Workload(64, 2048), 16, vary)
    assert len(result.points) == 6
    assert all(p["fits"] and p["best_spec"] for p in result.points)
    gqa = [p for p in result.points if p["knobs"]["attention"] == "gqa"]
    # More scale-out bandwidth is never slower, at every step of the sweep, and the sweep is not flat.
    times = [p["step_time_s"] for p in sorted(gqa, key=lambda p: p["knobs"]["scaleout_bw"])]
    assert all(slow >= fast for slow, fast in itertools.pairwise(times)), times
    assert times[0] > times[-1], times
    files = sw.write_outputs(result, str(tmp_path / "out" / "sweep"))
    sw.plot_sweep(result, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    with open(files[0]) as f:
        data = json.load(f)
    with open(files[1]) as f:
        csv_lines = f.read().count("\n")
    assert len(data["points"]) == 6 and csv_lines == 7

    bad = sw.run_sweep(get_preset("llama3-8b"), hw, Workload(64, 2048), 16, {"hbm_bytes": [1_000_000_000]})
    assert bad.points[0]["fits"] is False and bad.points[0]["reason"]


def test_unknown_knob_is_a_clear_error():
    with pytest.raises(sw.SweepError, match="unknown sweep knob 'nvlink'"):
        sw.parse_vary(["nvlink=1,2"])


def test_hardware_only_points_are_recosted_without_compiling(tmp_path, monkeypatch):
    from codesign.compile import measure

    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = measure.compile_in_subprocess

    def counting(*a, **k):
        calls.append(a[2].spec)
        return real(*a, **k)

    monkeypatch.setattr(measure, "compile_in_subprocess", counting)
    hw = load_hardware("cpu", devices=8)
    vary = {"hbm_bw": [50e9, 100e9]}
    result = sw.run_sweep(
        get_preset("tiny-dense"), hw, Workload(8, 32), 8, vary, verify=True, target="cpu", top_k=1
    )
    first, second = result.points
    assert first["recompiled"] is True and second["recompiled"] is False
    assert len(calls) >= 1 and len(calls) == len(set(calls))  # nothing compiled twice
    assert result.recost_saved_s > 0

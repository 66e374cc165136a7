"""experiments/published_runs/run.py: the Megatron rows as strategies, priced; one row end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "published_runs" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("published_runs_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_published_layouts_as_strategies():
    pr = _load()
    by_name = {r.name: r for r in pr.ROWS}
    s = pr.strategy(by_name["175B"], "full_layer", False)
    assert s.n_devices == 64 and s.microbatches == 64  # GBS 64 / (DP 1 x MBS 1)
    assert (s.size("tensor"), s.size("pipeline"), s.stages_per_device, s.schedule) == (8, 8, 3, "interleaved")
    s = pr.strategy(by_name["1T"], "selective", True)
    assert s.n_devices == 512 and s.microbatches == 512 and s.sp and s.stages_per_device == 1
    assert pr.strategy(by_name["22B"], "full_layer", False).microbatches == 1  # GBS 4 in one MBS-4 microbatch
    cfg = pr.gpt(by_name["175B"])
    assert cfg.mlp_dim == 4 * cfg.hidden and cfg.kv_heads == cfg.heads and cfg.ffn_activation == "gelu"


def test_script_runs_one_row(tmp_path):
    pr = _load()
    result = pr.main(["--rows", "22B", "--out", str(tmp_path)])
    full, sel = result["rows"]
    assert (full["recompute"], sel["recompute"]) == ("full", "selective+sp")
    assert (
        full["strategy"] == "tensor=8,remat=full_layer" and sel["strategy"] == "tensor=8,remat=selective,sp=1"
    )
    assert full["predicted_s"] > sel["predicted_s"] > 0  # full recompute runs one more forward
    for r in (full, sel):
        assert r["error"] == pytest.approx(r["predicted_s"] / r["published_s"] - 1)
        # No pipeline: the step is the matmul kernels, the memory-bound kernels and the exposed collectives.
        parts = r["compute_s"] + r["memory_bound_s"] + r["exposed_collective_s"] + r["pipeline_bubble_s"]
        assert parts == pytest.approx(r["predicted_s"], rel=1e-9)
        assert r["exposed_collective_s"] > 0  # Megatron's tensor all-reduces are never hidden
    layers = {r["recompute"]: r["predicted_ms"] for r in result["per_layer_22b"]}
    assert layers["full"] > layers["selective"] > layers["selective+sp"] > 0
    assert layers["full"] > layers["none"]
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["model"] == "22B"
    assert "| 22B | full |" in (tmp_path / "results.md").read_text()

"""The planner: search quality against --exhaustive, bad input, failing candidates, the plan file."""

import json
import subprocess
import sys

import pytest

from codesign.config import ConfigError, Workload
from codesign.hardware import load_hardware
from codesign.plan_file import Plan
from codesign.planner import PlanRequest, load_plan, plan
from codesign.planner.constraints import parse_constraints
from codesign.planner.export_maxtext import maxtext_overrides
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy, StrategyError

SMALL = {"remats": ("full",), "microbatches": (1,), "constraints": parse_constraints("pipeline=1,sequence=1")}


def _request(model: str, tmp_path, **kw) -> PlanRequest:
    base = {
        "cfg": get_preset(model),
        "hardware": load_hardware("cpu", devices=8),
        "workload": Workload(8, 32),
        "n_devices": 8,
        "target": "cpu",
        "top_k": 2,
        "workers": 2,
        "timeout_s": 300,
        "cache_dir": str(tmp_path / "cache"),
    }
    base.update(SMALL)
    base.update(kw)
    return PlanRequest(**base)


@pytest.mark.slow  # compiles every candidate (3-11 min at load 4-6)
@pytest.mark.parametrize("model", ["tiny-dense", "tiny-moe"])
def test_pick_is_within_5_percent_of_the_exhaustive_best(model, tmp_path):
    fast = plan(_request(model, tmp_path))
    full = plan(_request(model, tmp_path, exhaustive=True))
    assert fast.best is not None and full.best is not None
    assert full.search["compiled"] == full.search["scored"]  # every valid candidate compiled
    assert fast.search["compiled"] < full.search["compiled"]
    assert fast.best["step_time_s"] <= 1.05 * full.best["step_time_s"]
    assert (
        full.search["cache_hits"] >= fast.search["compiled"]
    )  # the second search reused the first's compiles


def test_timeouts_become_rows_and_the_search_finishes(tmp_path):
    result = plan(_request("tiny-dense", tmp_path, timeout_s=0.01, use_cache=False))
    outcomes = [r["compile"]["outcome"] for r in result.candidates if r.get("compile")]
    assert outcomes and set(outcomes) == {"timeout"}
    assert any("compile timeout" in line for line in result.explanation)


def test_plan_file_round_trips_and_names_the_choice(tmp_path):
    result = plan(_request("tiny-dense", tmp_path, target="analytic"))
    path = tmp_path / "plan.json"
    result.save(str(path))
    data = load_plan(str(path))
    assert data["schema"] == "codesign.plan/v1"
    best = data["candidates"][data["chosen"]]
    assert best["fits"] and Strategy.parse(best["strategy"]["spec"]).n_devices == 8
    for key in (
        "memory_per_device_bytes",
        "memory_capacity_bytes",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "breakdown",
        "evidence",
        "reasons",
    ):
        assert key in best
    # The file is the plan: reading it back gives the same plan, and the chosen row is the fastest that fits.
    result.scored = []  # the analytic point cloud is for --plot, not saved
    assert Plan.from_json(result.to_json()) == result
    assert Plan.from_json(data).to_json() == json.loads(json.dumps(result.to_json()))  # tuples become lists
    fitting = [c for c in data["candidates"] if c["fits"]]
    assert best == min(fitting, key=lambda c: c["step_time_s"])
    assert all(c["rank"] == i + 1 for i, c in enumerate(data["candidates"]))


def test_constraints_are_honoured(tmp_path):
    result = plan(
        _request(
            "tiny-dense",
            tmp_path,
            target="analytic",
            constraints=parse_constraints("tensor<=2,data>=2"),
            remats=("full", "none"),
        )
    )
    for c in result.candidates:
        mesh = c["strategy"]["mesh"]
        assert mesh.get("tensor", 1) <= 2 and mesh.get("data", 1) >= 2
    with pytest.raises(StrategyError, match="unknown key"):
        parse_constraints("tensr<=2")


def test_no_valid_layout_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="shares no factor"):
        plan(
            _request(
                "tiny-dense",
                tmp_path,
                target="analytic",
                workload=Workload(3, 32),
                n_devices=32,
                hardware=load_hardware("cpu", devices=32),
            )
        )
    # 8 sequences x 8 tokens x 8 heads x 2 layers cannot keep 2048 devices busy.
    with pytest.raises(ConfigError, match="no valid layout"):
        plan(
            _request(
                "tiny-dense",
                tmp_path,
                target="analytic",
                workload=Workload(8, 8),
                n_devices=2048,
                hardware=load_hardware("cpu", devices=2048),
            )
        )


def test_maxtext_export_splits_axes_into_ici_and_dcn(tmp_path):
    cfg = get_preset("llama3-8b")
    hw = load_hardware("h100", devices=16)
    req = PlanRequest(
        cfg=cfg,
        hardware=hw,
        workload=Workload(64, 4096),
        n_devices=16,
        target="analytic",
        constraints=parse_constraints("data=2,tensor=8"),
    )
    out = maxtext_overrides(plan(req), hw)
    assert out["ici_tensor_parallelism"] == 8 and out["dcn_data_parallelism"] == 2
    # MaxText trains on int(devices * per_device_batch_size) * gradient_accumulation_steps sequences.
    assert int(16 * out["per_device_batch_size"]) * out["gradient_accumulation_steps"] == 64


def test_large_moe_plan_uses_expert_parallelism():
    req = PlanRequest(
        cfg=get_preset("deepseek-v3"),
        hardware=load_hardware("h800", devices=2048),
        workload=Workload(8192, 4096),
        n_devices=2048,
        target="analytic",
        microbatches=(4, 8),
        remats=("full",),
    )
    result = plan(req)
    assert result.best is not None and result.best["strategy"]["mesh"].get("expert", 1) > 1


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "llama9", "--hardware", "h100", "--devices", "8"], "unknown model 'llama9'"),
        (["--model", "tiny-dense", "--hardware", "h900", "--devices", "8"], "h900"),
        (
            ["--model", "tiny-dense", "--hardware", "cpu", "--devices", "8", "--global-batch", "3"],
            "shares no factor",
        ),
        (
            [
                "--model",
                "tiny-dense",
                "--hardware",
                "cpu",
                "--devices",
                "2048",
                "--global-batch",
                "8",
                "--seq-len",
                "8",
            ],
            "no valid layout",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(argv, needle):
    out = subprocess.run(
        [sys.executable, "-m", "codesign", "plan", "--target", "analytic", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_cli_json_is_one_document(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "codesign",
            "plan",
            "--model",
            "tiny-dense",
            "--hardware",
            "cpu",
            "--devices",
            "8",
            "--target",
            "analytic",
            "--json",
            "--top",
            "5",
            "--export",
            "maxtext",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["candidates"]) == 5 and doc["export"]["maxtext"]["remat_policy"]


def test_zero_levels_are_searched_and_fit_where_replicated_state_does_not(tmp_path):
    """ZeRO-1/2 variants are scored for layouts with data replicas, and the prune does not drop a layout
    that only ZeRO makes fit: with HBM between the two, data=8 fits with zero=1 and not without."""
    import dataclasses

    from codesign.closed_form import analytic_memory

    cfg, w = get_preset("tiny-dense"), Workload(8, 32)
    hw = load_hardware("cpu", devices=8)
    data8 = analytic_memory(cfg, w, Strategy.parse("data=8,remat=full"))
    zero1 = analytic_memory(cfg, w, Strategy.parse("data=8,remat=full,zero=1"))
    assert zero1.optimizer == pytest.approx(data8.optimizer / 8)
    # HBM between the two: only sharded optimizer state fits for data=8.
    cap = (data8.total + zero1.total) / 2
    small = dataclasses.replace(
        hw, chip=dataclasses.replace(hw.chip, hbm_bytes=int(cap)), memory_reserve_bytes=0
    )
    result = plan(
        _request(
            "tiny-dense",
            tmp_path,
            target="analytic",
            hardware=small,
            remats=("full",),
            microbatches=(1,),
            zeros=(1, 2),
        )
    )
    specs = {row["spec"]: row for row in result.scored}
    assert "data=8,remat=full,zero=1" in specs and "data=8,remat=full,zero=2" in specs
    assert specs["data=8,remat=full,zero=1"]["fits"] and not specs["data=8,remat=full"]["fits"]


@pytest.mark.parametrize(
    "model,workload",
    [
        ("tiny-dense", Workload(64, 64)),
        ("tiny-dense", Workload(64, 64, param_dtype="bfloat16")),
        ("tiny-moe", Workload(64, 64, matmul_dtype="fp8", attention="flash")),
    ],
)
def test_search_bounds_never_exceed_what_they_bound(model, workload):
    """The pruning is only safe while its bounds are bounds. Over every layout of 8 devices (every
    schedule, V, microbatch count and sp, remat none and full, ZeRO 0-2), the step lower bound stays at
    or below the analytic estimate, and the state bound that drops layouts before scoring stays at or
    below the closed form's params + grads + optimizer state (with bfloat16 masters it assumed
    16 B/param, twice the 8 B the memory model holds, and dropped layouts that fit)."""
    from codesign.closed_form import analytic_memory
    from codesign.cost.estimate import estimate_analytic
    from codesign.planner.search import _state_bytes_lower_bound, step_lower_bound
    from codesign.sharding.enumerate import enumerate_strategies
    from codesign.sharding.strategy import PIPELINE_SCHEDULES

    cfg, hw, n = get_preset(model), load_hardware("h100", devices=8), 8
    en = enumerate_strategies(
        cfg,
        workload,
        n,
        remats=("none", "full"),
        microbatches=None,
        schedules=PIPELINE_SCHEDULES,
        sps=(False, True),
    )
    assert len(en.valid) > 500
    for s in en.valid:
        est = estimate_analytic(cfg, workload, s, hw)
        assert step_lower_bound(cfg, workload, s, hw) <= est.step_time_s, s.spec
        for zero in (0, 1, 2):
            z = s.replace(zero=zero)
            m = analytic_memory(cfg, workload, z, platform=hw.platform)
            assert _state_bytes_lower_bound(cfg, workload, z, zero) <= m.params + m.grads + m.optimizer, (
                z.spec
            )

"""The command line: its package layout, one-line errors with exit status 2, strict JSON, and the tables
and files a new user meets. In-process (`codesign.cli.main`) wherever JAX's start-up allows it."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from codesign.cli import SUBCOMMANDS, build_parser, main, print_json
from tests.conftest import REPO, env_asking_for_host_devices

CLI_DIR = pathlib.Path(REPO) / "codesign" / "cli"
TINY = ["--model", "tiny-dense", "--hardware", "cpu", "--devices", "8"]


def _run(capsys, argv):
    """(exit status, stdout, non-empty stderr lines) of `codesign ARGV`, run in this process."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def _one_error_line(err: list[str], command: str) -> str:
    assert len(err) == 1, err
    assert err[0].startswith(f"codesign {command}: error: "), err
    return err[0]


def _strict(text: str):
    def no_constants(name):
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=no_constants)


# -- package layout -------------------------------------------------------------------------------------
def test_cli_is_a_package_with_an_explicit_list_and_no_import_cycle():
    names = {m.__name__.rsplit(".", 1)[1] for m in SUBCOMMANDS}
    assert names == {"info", "plan", "compile", "train", "explore"}
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {"models", "hardware", "plan", "compile", "train", "validate", "explore", "calibrate"}
    for path in CLI_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert "__import__" not in path.read_text(), path.name
        if path.name == "__init__.py":
            continue
        for node in ast.walk(tree):  # submodules reach shared code through _common only: no cycle
            if isinstance(node, ast.ImportFrom) and node.module == "codesign.cli":
                pytest.fail(f"{path.name} imports codesign.cli (the package): an import cycle")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("codesign.cli."):
                assert node.module == "codesign.cli._common", f"{path.name} imports {node.module}"
    assert not list((CLI_DIR.parent).glob("cli_*.py")), "old cli_*.py modules are back"


def test_version_via_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "codesign", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("codesign ") and "jax " in out.stdout


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "(default: auto)",
        "(default: 600",
        "(default: 0.0)",
        "(default: float32)",
        "(default: xla)",
    ):
        assert needle in text, needle
    assert "default: None" not in text and "default: False" not in text


# -- one-line errors, exit status 2 --------------------------------------------------------------------
@pytest.mark.parametrize(
    "content,needle",
    [
        ("name: x\npeak_flops: {bf16: 1e12\n", "not valid YAML line 3"),
        (
            "name: !!python/object/apply:os.system ['true']\n",
            "the YAML tag 'tag:yaml.org,2002:python/object/apply",
        ),
        (b"\xff\xfe\x00junk", "not UTF-8"),
        (
            "name: x\nplatform: gpu\npeak_flops: {bf16: .nan}\nhbm_bytes: 1\nhbm_bytes_per_s: 1\n",
            "finite number",
        ),
    ],
)
def test_bad_hardware_profile_is_one_line_naming_the_file(tmp_path, capsys, content, needle):
    f = tmp_path / "gpu.yaml"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, out, err = _run(
        capsys,
        ["plan", "--model", "tiny-dense", "--hardware", str(f), "--devices", "8", "--target", "analytic"],
    )
    line = _one_error_line(err, "plan")
    assert rc == 2 and out == "" and str(f) in line and needle in line, line


def test_plan_file_with_chosen_out_of_range_is_one_line(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {"schema": "codesign.plan/v1", "candidates": [{"strategy": {"spec": "fsdp=8"}}], "chosen": 3}
        )
    )
    rc, _, err = _run(capsys, ["compile", *TINY, "--plan", str(f), "--target", "analytic"])
    line = _one_error_line(err, "compile")
    assert rc == 2 and "p.json" in line and "chosen is 3" in line


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["plan", *TINY, "--global-batch", "0"],
            "argument --global-batch: expected a positive integer, got '0'",
        ),
        (["plan", *TINY, "--top", "0"], "argument --top: expected a positive integer"),
        (["plan", *TINY, "--headroom", "1.5"], "argument --headroom: expected a fraction in [0, 1)"),
        (["plan", "--model", "tiny-dense", "--hardware", "cpu"], "required: --devices"),
        (
            ["explore", "decode", "--contexts", "1024,a"],
            "argument --contexts: expected a positive integer, got 'a'",
        ),
        (["nothing"], "invalid choice: 'nothing'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, needle):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and "--help" in err[0], err


def test_save_hlo_needs_a_compiler_target(capsys):
    rc, _, err = _run(
        capsys, ["compile", *TINY, "--strategy", "fsdp=8", "--target", "analytic", "--save-hlo", "x.hlo"]
    )
    assert rc == 2 and "--save-hlo needs a compiler target" in _one_error_line(err, "compile")


def test_missing_plan_file_is_one_line(tmp_path, capsys):
    rc, _, err = _run(
        capsys, ["compile", *TINY, "--plan", str(tmp_path / "nope.json"), "--target", "analytic"]
    )
    line = _one_error_line(err, "compile")
    assert rc == 2 and "nope.json" in line and "codesign plan" in line


def test_bad_rules_file_fails_before_compiling(tmp_path, capsys):
    f = tmp_path / "rules.yaml"
    f.write_text("- [embed, fsdp]\n- [mlp, 5]\n")
    rc, _, err = _run(capsys, ["compile", *TINY, "--strategy", f"fsdp=8,rules={f}", "--target", "cpu"])
    line = _one_error_line(err, "compile")
    assert rc == 2 and "rules.yaml" in line and "row 2" in line


def test_unknown_sweep_knob_is_one_line(capsys):
    rc, _, err = _run(capsys, ["explore", "sweep", *TINY, "--vary", "speed=1,2"])
    assert rc == 2 and "unknown sweep knob 'speed'" in _one_error_line(err, "explore")


def test_output_directory_is_checked_before_the_search(tmp_path, capsys):
    rc, _, err = _run(
        capsys, ["plan", *TINY, "--target", "analytic", "--out", str(tmp_path / "no" / "p.json")]
    )
    line = _one_error_line(err, "plan")
    assert rc == 2 and "does not exist" in line


def test_cudnn_without_a_gpu_target_fails_fast(capsys):
    rc, _, err = _run(capsys, ["plan", *TINY, "--attention", "cudnn"])
    assert rc == 2 and "cuDNN attention needs an NVIDIA GPU target" in _one_error_line(err, "plan")
    rc, _, err = _run(
        capsys,
        [
            "plan",
            "--model",
            "tiny-dense",
            "--hardware",
            "h100",
            "--devices",
            "8",
            "--attention",
            "cudnn",
            "--target",
            "cpu",
        ],
    )
    line = _one_error_line(err, "plan")
    assert rc == 2 and "--target analytic" in line and "--attention xla" in line
    # The closed form compiles nothing: on GPU hardware it may cost the flash kernel.
    rc, out, _ = _run(
        capsys,
        [
            "plan",
            "--model",
            "tiny-dense",
            "--hardware",
            "h100",
            "--devices",
            "8",
            "--attention",
            "cudnn",
            "--target",
            "analytic",
            "--json",
            "--top",
            "2",
        ],
    )
    assert rc == 0 and _strict(out)["workload"]["attention"] == "cudnn"


def test_xla_flags_host_device_count_is_not_silently_replaced():
    """The check behind plan's cpu target and train/validate's own emulation (runtime.configure, before
    JAX starts), on a user's environment; the commands themselves: the subprocess test below."""
    from codesign import runtime

    user = env_asking_for_host_devices(4)
    with pytest.raises(runtime.EnvironmentConflict, match="asks for 4 .* emulates 8"):
        runtime.check_host_device_flag(8, "this run", user)
    runtime.check_host_device_flag(4, "this run", user)  # the same count is fine
    # no count given: nothing to conflict with
    runtime.check_host_device_flag(8, "this run", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})


# -- strict JSON ---------------------------------------------------------------------------------------
def test_print_json_writes_null_for_non_finite_and_flags_it(capsys):
    print_json({"steps": [{"loss": 2.0}, {"loss": float("nan")}], "ratio": float("inf"), "ok": 1.5})
    doc = _strict(capsys.readouterr().out)
    assert doc["steps"][1]["loss"] is None and doc["ratio"] is None and doc["ok"] == 1.5
    assert doc["non_finite"] == ["steps[1].loss", "ratio"]
    print_json({"fine": 1.0})
    assert "non_finite" not in _strict(capsys.readouterr().out)


# -- plan: files, progress, tables ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_plan():
    from codesign.hardware import load_hardware
    from codesign.planner import PlanRequest, default_workload, plan
    from codesign.presets import get_preset

    cfg = get_preset("tiny-dense")
    return plan(
        PlanRequest(
            cfg=cfg,
            hardware=load_hardware("cpu", devices=8),
            workload=default_workload(cfg, 8),
            n_devices=8,
            target="analytic",
        )
    )


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_plan_file_permissions_follow_the_umask(tmp_path, tiny_plan, umask, mode):
    old = os.umask(umask)
    try:
        tiny_plan.save(str(tmp_path / "p.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "p.json").st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


def test_progress_bar_ends_full_when_the_search_stops_early(capsys):
    from codesign.cli._common import progress

    with progress() as update:
        update("compiling", 0, 12)
        update("compiling", 4, 12)
    task = update.bar.tasks[0]
    assert (task.completed, task.total) == (4, 4) and "done early" in task.description
    with pytest.raises(KeyboardInterrupt), progress() as update:  # interrupted: left as it was
        update("compiling", 4, 12)
        raise KeyboardInterrupt
    assert update.bar.tasks[0].total == 12


def test_plan_table_never_cuts_the_strategy_and_uses_gib(tiny_plan, capsys):
    import copy

    from codesign.cli._common import print_wide
    from codesign.planner.render import plan_table

    p = copy.deepcopy(tiny_plan)
    long_spec = (
        "data=2,fsdp=2,tensor=2,remat=full,microbatches=4,order=pipeline.data.fsdp.expert.sequence.tensor"
    )
    p.candidates[1]["strategy"]["spec"] = long_spec
    p.candidates[1]["tokens_per_s"] = 123456789012345.0  # widen the other columns too
    capsys.readouterr()
    print_wide(plan_table(p))
    out = capsys.readouterr().out
    assert any(long_spec in line for line in out.splitlines()), out
    assert "GiB" in out or "MiB" in out
    assert " GB " not in out


def test_pareto_plot_log_memory_axis_front_and_hbm_line(tiny_plan, tmp_path):
    import matplotlib.pyplot as plt

    from codesign.planner.render import CLIP_X_CAPACITY, pareto_figure, pareto_front, plot_pareto

    fig = pareto_figure(tiny_plan)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert ax.get_xscale() == "log"
    assert any(s.startswith("Pareto front") for s in labels) and any(
        s.startswith("HBM capacity") for s in labels
    )
    cap_gib = tiny_plan.hardware["memory_capacity_bytes"] / 2**30
    assert ax.get_xlim()[1] <= CLIP_X_CAPACITY * cap_gib * 1.5
    # The front: no fitting point beats a front point on both axes; every fitting point is matched by one.
    fit = [p for p in tiny_plan.scored if p["fits"]]
    front = pareto_front(tiny_plan.scored)
    mem, t = "memory_per_device_bytes", "step_time_s"
    for f in front:
        assert not any((p[mem] <= f[mem] and p[t] < f[t]) or (p[mem] < f[mem] and p[t] <= f[t]) for p in fit)
    for p in fit:
        assert any(
            f["memory_per_device_bytes"] <= p["memory_per_device_bytes"]
            and f["step_time_s"] <= p["step_time_s"]
            for f in front
        )
    plot_pareto(tiny_plan, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# -- other tables --------------------------------------------------------------------------------------
def test_hardware_table_has_sources_and_no_zero_groups(capsys):
    rc, out, _ = _run(capsys, ["hardware"])
    assert rc == 0 and "sources" in out and "datasheet" in out
    assert "×0 " not in out and "ib ×all" in out and "80.0 GiB" in out


def test_sweep_table_prints_knobs_as_typed_and_yes_no(capsys):
    rc, out, _ = _run(capsys, ["explore", "sweep", *TINY, "--vary", "scaleout_bw=25G,50G"])
    assert rc == 0
    rows = [line for line in out.splitlines() if "25G" in line or "50G" in line]
    assert len(rows) == 2 and all(" yes " in r or " no " in r for r in rows)
    assert "25000000000" not in out and "True" not in out and "False" not in out


def test_calibrate_prints_a_table_and_warns_about_the_cpu():
    from rich.console import Console

    from codesign.calibrate import render_calibration

    result = {
        "platform": "cpu",
        "device_kind": "cpu",
        "devices": 8,
        "catalog_base": "cpu",
        "wall_s": 1.0,
        "matmul": [{"dtype": "bf16", "n": 256, "seconds": 1e-3, "flops_per_s": 3.4e10, "fraction": 0.034}],
        "sustained_matmul": None,
        "hbm_bytes_per_s": 2e10,
        "out_path": None,
        "collectives": [
            {"kind": "all-gather", "bytes": 1 << 20, "seconds": 1e-4, "bytes_per_s": 9e9, "efficiency": 0.73}
        ],
        "profile": {"efficiency": {"hbm": 0.4, "sustained": 1.0}},
    }
    console = Console(record=True, width=120)
    console.print(render_calibration(result))
    text = console.export_text()
    assert "warning: calibrate measured the host CPU" in text
    assert "34 GFLOP/s" in text and "3.4%" in text and "all-gather" in text and "9 GB/s" in text
    assert "73%" in text  # the all-gather's bandwidth against the cost model's (the profile's collective)
    assert "{'" not in text  # not a raw dict
    console = Console(record=True, width=120)
    console.print(render_calibration({**result, "platform": "gpu"}))
    assert "warning" not in console.export_text()


def test_readme_links_stay_inside_the_repository():
    readme = (pathlib.Path(REPO) / "README.md").read_text()
    assert "../" not in readme
    assert (pathlib.Path(REPO) / "docs" / "INTERFACE.md").is_file() and "docs/INTERFACE.md" in readme


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "tiny-dense", "--strategy", "fsdp=8", "--steps", "1"],
        ["plan", *TINY, "--target", "cpu"],
    ],
)
def test_conflicting_xla_flags_stop_the_command_before_jax_starts(tmp_path, argv):
    """The issue's case: the user's XLA_FLAGS asks for 4 host devices, the run needs 8."""
    env = {**os.environ, "PYTHONPATH": REPO, **env_asking_for_host_devices(4)}
    env.pop("JAX_PLATFORMS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)  # this test process's own setting (conftest)
    out = subprocess.run(
        [sys.executable, "-m", "codesign", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"codesign {argv[0]}: error: ")
    assert "asks for 4 host devices" in lines[0] and "emulates 8" in lines[0]

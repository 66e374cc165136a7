"""The trainer and validate on 8 emulated CPU devices: learning, bit-exact resume, resharded restore,
clear errors, non-finite steps (stop / skip), corrupt checkpoints on resume, and validate's output.

Every training run here uses the same model, workload and optimizer settings (`RUN`), so one compiled
program (cached per process by `get_program`) serves all of them; only the resharded test compiles a
second layout, and the NaN tests a poisoned copy of the step.
"""

import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.state_layout import OptimizerConfig
from codesign.train import trainer
from codesign.train.checkpoint import Checkpointer, CheckpointError
from codesign.train.trainer import (
    NonFiniteLoss,
    TrainError,
    TrainRun,
    build_mesh,
    get_program,
    restore_state,
    run_training,
)
from codesign.train.validate import spearman
from tests.conftest import REPO, cpu_child_env, require_devices

RUN = {"global_batch": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 3, "schedule_steps": 30, "seed": 0}
FSDP = "fsdp=8,remat=full"
CLI_RUN = [
    "--model",
    "tiny-dense",
    "--strategy",
    FSDP,
    "--devices",
    "8",
    "--global-batch",
    "8",
    "--seq-len",
    "32",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "3",
    "--schedule-steps",
    "30",
    "--no-progress",
]


def train(model="tiny-dense", *, return_state=False, log=None, **kw):
    """run_training with RUN's settings unless `kw` overrides them."""
    return run_training(TrainRun(model=model, **{**RUN, **kw}), return_state=return_state, log=log)


def _strict_json(text):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, Go, jq) do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(autouse=True)
def _eight_devices():
    require_devices(8)


def _losses(result):
    return [r["loss"] for r in result["steps"]]


def _leaves_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _plan(path, specs_and_times, devices=8, fits=None, chosen=0):
    cands = []
    for i, (spec, t) in enumerate(specs_and_times):
        s = Strategy.parse(spec)
        cands.append(
            {
                "rank": i + 1,
                "strategy": s.to_json(),
                "fits": True if fits is None else fits[i],
                "memory_per_device_bytes": 1,
                "memory_capacity_bytes": 2,
                "step_time_s": t,
                "tokens_per_s": 256 / t,
                "mfu": 0.1,
                "breakdown": {},
                "evidence": "analytic",
                "reasons": [],
            }
        )
    doc = {
        "schema": "codesign.plan/v1",
        "model": {"name": "tiny-dense"},
        "hardware": {"name": "cpu", "devices": devices},
        "workload": {"mode": "train", "global_batch": 8, "seq_len": 32, "dtype": "bfloat16"},
        "search": {},
        "candidates": cands,
        "chosen": chosen,
    }
    path.write_text(json.dumps(doc))
    return str(path)


def _tree_snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


# -- learning ---------------------------------------------------------------------------------------------
# tiny-dense by hand (codesign/presets.py): vocab 256, hidden 64, 2 layers, 8 heads x 16, 4 KV heads, SwiGLU 128.
#   per layer: q 64*128 + k 64*64 + v 64*64 + o 128*64 = 24,576; MLP 3*64*128 = 24,576; 2 norm scales 128
#   N (non-embedding) = 2 * 49,280 + final norm 64 + LM head 64*256 = 115,008
#   attention scores + values, causal (mean context 16): 2 * 8 * (16 + 16) * 16 = 8,192 per layer -> 16,384
#   training FLOPs per token = 6 N + 3 * 16,384 = 739,200
TINY_DENSE_TRAIN_FLOPS_PER_TOKEN = 739_200
TOKENS_PER_STEP = 8 * 32  # RUN's global batch x seq_len
CPU_NOMINAL_PEAK = 1e12  # the catalog's cpu chip, per device


def test_loss_decreases_over_30_steps(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = train(strategy=FSDP, steps=30, metrics=str(metrics))
    losses = _losses(r)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert r["devices"] == 8 and r["strategy"] == FSDP and r["final_step"] == 30
    # The compile step is excluded from throughput; later steps report tokens/s and (nominal) MFU, which
    # must agree with the hand count above: MFU = 6N-style FLOPs x tokens / (time x devices x peak).
    assert r["train_flops_per_token"] == TINY_DENSE_TRAIN_FLOPS_PER_TOKEN
    first, rest = r["steps"][0], r["steps"][1:]
    assert first["compile"] and first["tokens_per_s"] is None and first["mfu"] is None
    for s in rest:
        assert s["tokens_per_s"] * s["step_time_s"] == pytest.approx(TOKENS_PER_STEP)
        assert s["mfu"] == pytest.approx(
            TINY_DENSE_TRAIN_FLOPS_PER_TOKEN * TOKENS_PER_STEP / (s["step_time_s"] * 8 * CPU_NOMINAL_PEAK)
        )
    assert r["mfu_basis"]["nominal"] is True and r["summary"]["timed_steps"] == 29
    lines = [_strict_json(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31)) and lines[-1]["loss"] == losses[-1]


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_is_bit_exact_and_keeps_the_saved_schedule(tmp_path):
    """The README's shape: train to 3, then `--resume` to 6 with no optimizer flags. The resumed run
    takes the checkpoint's schedule (30 steps), so it equals 6 uninterrupted steps on that schedule; a
    schedule stretched to the new --steps would change every later loss."""
    ck = str(tmp_path / "ck")
    straight = train(strategy=FSDP, steps=6, return_state=True)
    first = train(strategy=FSDP, steps=3, checkpoint_dir=ck)
    assert first["checkpoint"] == [{"step": 3, "path": os.path.join(ck, "3")}]
    said = []
    second = train(
        strategy=FSDP,
        steps=6,
        checkpoint_dir=ck,
        resume=True,
        return_state=True,
        log=said.append,
        lr=None,
        warmup_steps=None,
        schedule_steps=None,
    )
    assert second["resumed_from"] == 3 and [s["step"] for s in second["steps"]] == [4, 5, 6]
    assert second["optimizer"]["total_steps"] == 30 and not [m for m in said if "differ" in m], said
    assert _losses(first) + _losses(second) == _losses(straight)  # exact equality
    assert _leaves_bytes(second["state"]) == _leaves_bytes(straight["state"])  # params and optimizer state


def test_resharded_restore_fsdp8_to_data2_tensor4(tmp_path):
    ck = str(tmp_path / "ck")
    saved = train(strategy=FSDP, steps=2, checkpoint_dir=ck, return_state=True)
    other = Strategy.parse("data=2,tensor=4,remat=full")
    cfg = get_preset("tiny-dense")
    opt = OptimizerConfig(learning_rate=RUN["lr"], warmup_steps=RUN["warmup_steps"], total_steps=30)
    prog = get_program(cfg, Workload(8, 32), other, build_mesh(other), opt)
    step, state, extra = restore_state(prog, ck)  # no init, no compile: read straight into the new layout
    assert step == 2 and extra["strategy"] == FSDP and extra["model_fingerprint"] == cfg.fingerprint()
    assert _leaves_bytes(state["params"]) == _leaves_bytes(saved["state"]["params"])
    assert _leaves_bytes(state["opt_state"]) == _leaves_bytes(saved["state"]["opt_state"])
    got = jax.tree.map(lambda x: x.sharding, state["params"])
    assert all(
        a.is_equivalent_to(b, x.ndim)
        for a, b, x in zip(
            jax.tree.leaves(got), jax.tree.leaves(prog.param_shardings), jax.tree.leaves(state["params"])
        )
    )
    # And training continues under the new layout.
    cont = train(strategy="data=2,tensor=4", steps=3, checkpoint_dir=ck, resume=True)
    assert cont["resumed_from"] == 2 and [s["step"] for s in cont["steps"]] == [3]
    assert np.isfinite(cont["steps"][0]["loss"])


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys):
    """64 flipped bytes in the newest step's data: resume says so in one line, continues from the step
    before (bit-exact with an uninterrupted run), and keeps the damaged step's bytes under another name."""
    from codesign.cli import main

    ck = tmp_path / "ck"
    train(strategy=FSDP, steps=3, checkpoint_dir=str(ck), save_every=1)
    files = glob.glob(str(ck / "3" / "state" / "**" / "d" / "*"), recursive=True)
    victim = pathlib.Path(max(files, key=os.path.getsize))
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    victim.write_bytes(bytes(data))

    capsys.readouterr()
    rc = main(["train", *CLI_RUN, "--steps", "4", "--checkpoint-dir", str(ck), "--resume", "--json"])
    captured = capsys.readouterr()
    out = _strict_json(captured.out)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: checkpoint step 3")]
    assert rc == 0 and out["resumed_from"] == 2 and [s["step"] for s in out["steps"]] == [3, 4]
    assert len(warnings) == 1 and "resuming from step 2, the newest good one" in warnings[0], captured.err
    assert "Traceback" not in captured.err
    moved = out["set_aside"][0]["moved_to"]
    assert moved == str(ck / "3.unreadable") and os.path.isdir(moved)
    assert _losses(out) == _losses(train(strategy=FSDP, steps=4))[2:]
    with Checkpointer(ck, read_only=True) as c:
        assert (
            c.all_steps() == [1, 2, 4] and c.restore(None, _abstract_of(c, 4)).verified
        )  # 4 saved as the last step


def _abstract_of(ck, step):
    cfg = get_preset("tiny-dense")
    opt = OptimizerConfig(learning_rate=RUN["lr"], warmup_steps=RUN["warmup_steps"], total_steps=30)
    strat = Strategy.parse(FSDP)
    return get_program(cfg, Workload(8, 32), strat, build_mesh(strat), opt).abstract_state


# -- non-finite steps ---------------------------------------------------------------------------------------
class _Poisoned:
    """A TrainProgram whose step turns every param NaN at step `at` (1-based), and the loss too unless
    `loss=False` (an update that overflows while the loss it was computed from is still finite): a
    blow-up at a known step, through the trainer's real code paths."""

    def __init__(self, prog, at, loss=True):
        self._prog = prog

        def step(state, batch):
            new, out = prog.step_fn(state, batch)
            bad = state["step"] + 1 == at
            params = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), new["params"])
            return {**new, "params": params}, {"loss": jnp.where(bad & loss, jnp.nan, out["loss"])}

        self.step_fn = jax.jit(step)

    def __getattr__(self, name):
        return getattr(self._prog, name)


@pytest.fixture
def poison_at(monkeypatch):
    def install(step, loss=True):
        real = trainer.get_program
        monkeypatch.setattr(trainer, "get_program", lambda *a, **kw: _Poisoned(real(*a, **kw), step, loss))

    return install


def test_nan_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, capsys, monkeypatch, poison_at):
    from codesign.cli import main

    poison_at(5)
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    capsys.readouterr()
    rc = main(
        [
            "train",
            *CLI_RUN,
            "--steps",
            "8",
            "--checkpoint-dir",
            str(ck),
            "--save-every",
            "1",
            "--keep",
            "2",
            "--metrics",
            str(metrics),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(
        "codesign train: error: step 5: loss is nan; stopped without saving it (the "
        f"checkpoints in {ck} (steps [3, 4]) are intact; --resume continues from step 4)"
    )
    assert "--nan-policy skip" in err[-1]
    lines = [_strict_json(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["loss"] is None and lines[-1]["nonfinite"] == ["loss"]
    with Checkpointer(ck, read_only=True) as c:
        assert c.all_steps() == [3, 4]  # rotation (keep 2) never reached past the last good step
    # The kept step is a good one: resuming from it (no poison now) matches an uninterrupted run.
    monkeypatch.undo()
    resumed = train(strategy=FSDP, steps=6, checkpoint_dir=str(ck), resume=True)
    assert resumed["resumed_from"] == 4 and _losses(resumed) == _losses(train(strategy=FSDP, steps=6))[4:]


def test_non_finite_update_with_a_finite_loss_is_not_saved(tmp_path, poison_at):
    """The loss of step 2 is finite but its update is not: the save of step 2 is refused, the run stops."""
    poison_at(2, loss=False)
    ck = tmp_path / "ck"
    with pytest.raises(
        NonFiniteLoss,
        match=r"step 2: NaN or Infinity in params/.* and \d+ more leaves; stopped "
        r"without saving it \(the checkpoints in .* \(steps \[1\]\) are intact",
    ):
        train(strategy=FSDP, steps=3, checkpoint_dir=str(ck), save_every=1)
    with Checkpointer(ck, read_only=True) as c:
        assert c.all_steps() == [1]


def test_nan_policy_skip_keeps_the_previous_state(tmp_path, capsys, poison_at):
    from codesign.cli import main

    poison_at(3)
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    capsys.readouterr()
    rc = main(
        [
            "train",
            *CLI_RUN,
            "--steps",
            "5",
            "--nan-policy",
            "skip",
            "--checkpoint-dir",
            str(ck),
            "--save-every",
            "1",
            "--keep",
            "5",
            "--metrics",
            str(metrics),
            "--json",
        ]
    )
    out = _strict_json(capsys.readouterr().out)  # strict JSON on stdout despite the NaN
    rows = out["steps"]
    assert rc == 0 and [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and rows[2]["nonfinite"] == ["loss"]
    assert all(np.isfinite(r["loss"]) and "nonfinite" not in r for i, r in enumerate(rows) if i != 2)
    assert out["summary"]["skipped_steps"] == [3] and out["nan_policy"] == "skip"
    assert _strict_json(metrics.read_text().splitlines()[2])["nonfinite"] == ["loss"]
    # Step 3's update was dropped: its params and optimizer moments are step 2's, bit for bit, while the
    # step counter (the data position) moved on; Adam counted 4 applied updates by step 5.
    with Checkpointer(ck, read_only=True) as c:
        s2, s3, s5 = (c.restore(k, _abstract_of(c, k)).state for k in (2, 3, 5))
    assert _leaves_bytes(s3["params"]) == _leaves_bytes(s2["params"])
    assert _leaves_bytes(s3["opt_state"]) == _leaves_bytes(s2["opt_state"])
    assert int(s3["step"]) == 3 and int(s5["step"]) == 5
    counts = [
        int(x)
        for p, x in jax.tree_util.tree_flatten_with_path(s5["opt_state"])[0]
        if jax.tree_util.keystr(p).endswith("count']") or jax.tree_util.keystr(p).endswith(".count")
    ]
    assert counts and set(counts) == {4}


# -- errors ---------------------------------------------------------------------------------------------
def test_cudnn_plan_on_cpu_names_the_fix(tmp_path):
    """A plan costed for cuDNN attention carries it into train; on CPU that is refused with the fix."""
    from codesign.config import ConfigError

    path = tmp_path / "cudnn.json"
    _plan(tmp_path / "p.json", [(FSDP, 0.01)])
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["workload"]["attention"] = "cudnn"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="cuDNN attention needs an NVIDIA GPU.*--attention xla"):
        train(plan=str(path), steps=1)
    out = train(plan=str(path), steps=1, attention="xla")
    assert out["attention"] == "xla"


def test_plan_device_mismatch(tmp_path):
    plan = _plan(tmp_path / "p4.json", [("fsdp=4,remat=full", 0.01)], devices=4)
    with pytest.raises(StrategyError, match="plan needs 4 devices, 8 attached"):
        train(plan=plan, steps=1)
    with pytest.raises(StrategyError, match="--devices 4 given, but 8"):
        train(strategy=FSDP, devices=4, steps=1)
    with pytest.raises(TrainError, match="--nan-policy 'sometimes'"):
        train(strategy=FSDP, steps=1, nan_policy="sometimes")
    with pytest.raises(TrainError, match="--lr must be a positive finite number, got nan"):
        train(strategy=FSDP, steps=1, lr=float("nan"))
    with pytest.raises(TrainError, match="--keep must be >= 1, got 0"):
        train(strategy=FSDP, steps=1, keep=0)


def test_missing_token_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(strategy=FSDP, steps=1, data=str(tmp_path / "none.bin"))


def test_incompatible_checkpoint_leaves_directory_untouched(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    train(strategy=FSDP, steps=1, checkpoint_dir=ck)
    before = _tree_snapshot(ck)
    assert before
    for resume in (True, False):
        with pytest.raises(CheckpointError, match="architecture differs"):
            train("tiny-mla", strategy=FSDP, steps=2, checkpoint_dir=ck, resume=resume)
    with pytest.raises(TrainError, match="pass --resume"):
        train(strategy=FSDP, steps=2, checkpoint_dir=ck)
    assert _tree_snapshot(ck) == before
    # Through the CLI: one clear line, exit status 2.
    from codesign.cli import main

    capsys.readouterr()
    rc = main(
        [
            "train",
            "--model",
            "tiny-mla",
            "--strategy",
            FSDP,
            "--devices",
            "8",
            "--steps",
            "2",
            "--global-batch",
            "8",
            "--seq-len",
            "32",
            "--checkpoint-dir",
            ck,
            "--resume",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("codesign train: error: checkpoint directory")
    assert _tree_snapshot(ck) == before


def test_train_from_plan_cli_json(tmp_path, capsys):
    plan = _plan(tmp_path / "p.json", [(FSDP, 0.01)])
    from codesign.cli import main

    capsys.readouterr()
    rc = main(
        [
            "train",
            "--model",
            "tiny-dense",
            "--plan",
            plan,
            "--devices",
            "8",
            "--steps",
            "2",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "3",
            "--schedule-steps",
            "30",
            "--json",
            "--no-progress",
        ]
    )
    out = _strict_json(capsys.readouterr().out)  # stdout holds exactly one (strict) JSON document
    assert rc == 0 and out["devices"] == 8 and out["strategy"] == FSDP and out["checkpoint"] == []
    assert [set(s) >= {"step", "loss", "tokens_per_s", "mfu", "step_time_s"} for s in out["steps"]] == [
        True,
        True,
    ]
    assert out["workload"]["global_batch"] == 8 and out["workload"]["seq_len"] == 32


# -- validate -------------------------------------------------------------------------------------------
def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks
    # Two points always give +-1, which says nothing about a planner; no spread is no order.
    assert spearman([1, 2], [2, 1]) is None and spearman([1], [2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_validate_rows(tmp_path):
    from codesign.train.validate import run_validation

    plan = _plan(
        tmp_path / "p.json",
        [
            (FSDP, 0.02),
            ("fsdp=8,remat=none", 0.025),
            ("pipeline=2,fsdp=4,remat=full", 0.03),  # a pipelined candidate is measured like any other
            ("data=2,tensor=4,remat=full", 0.04),
        ],
        fits=[True, False, True, True],
    )
    said = []
    r = run_validation("tiny-dense", plan, top=2, steps=2, warmup=1, log=said.append)
    assert [row["spec"] for row in r["rows"]] == [FSDP, "pipeline=2,fsdp=4,remat=full"]
    for row in r["rows"]:
        assert set(row) >= {"spec", "estimated_step_time_s", "measured_step_time_s", "ratio"}
        assert row["measured_step_time_s"] > 0 and len(row["step_times_s"]) == 2
        assert min(row["step_times_s"]) <= row["measured_step_time_s"] <= max(row["step_times_s"])
    assert (
        r["rank_correlation"] is None and "at least 3" in r["rank_correlation_note"]
    )  # two rows: no rank claim
    assert [s["spec"] for s in r["skipped"]] == ["fsdp=8,remat=none"]
    assert "CPU" in r["caveat"] and [m for m in said if m.startswith("note: measured on CPU")]
    assert not [m for m in said if m.startswith("skip ")]  # one summary line, not one per candidate


def test_validate_refuses_what_it_cannot_measure(tmp_path, capsys):
    from codesign.cli import main
    from codesign.train.validate import run_validation

    plan4 = _plan(tmp_path / "p4.json", [("fsdp=4,remat=full", 0.01), ("data=4,remat=full", 0.02)], devices=4)
    with pytest.raises(
        TrainError,
        match=r"is a plan for 4 devices, but 8 are attached; run validate with "
        r"--devices 4",
    ):
        run_validation("tiny-dense", plan4)
    none_fit = _plan(tmp_path / "big.json", [(FSDP, 0.01), ("data=8,remat=full", 0.02)], fits=[False, False])
    for plan, message in (
        (plan4, "is a plan for 4 devices"),
        (none_fit, "nothing was measured: none of the 2"),
    ):
        capsys.readouterr()
        rc = main(["validate", "--model", "tiny-dense", "--plan", plan, "--steps", "1", "--warmup", "0"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert rc == 2 and message in err[-1] and err[-1].startswith("codesign validate: error:"), (
            captured.err
        )
        assert captured.out == "" and not [line for line in err if line.startswith("skip ")]


def test_validate_devices_below_the_plan_is_one_line(tmp_path):
    """The issue's case in a fresh process: `validate --devices 4` on an 8-device plan used to exit 0 with
    an empty table and a "skip" line per candidate."""
    plan = _plan(tmp_path / "p8.json", [(FSDP, 0.01), ("data=8,remat=full", 0.02)])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codesign",
            "validate",
            "--model",
            "tiny-dense",
            "--plan",
            plan,
            "--devices",
            "4",
        ],
        check=False,
        env=cpu_child_env(4),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip() == (
        f"codesign validate: error: plan {plan} is a plan for 8 devices, but 4 are "
        f"attached; run validate with --devices 8 (CPU emulation), or make a plan for "
        f"4 devices"
    )

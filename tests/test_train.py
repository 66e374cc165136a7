"""The trainer and validate on 8 emulated CPU devices: learning, bit-exact resume, resharded restore,
clear errors, and validate's output.

Every training run here uses the same model, workload and optimizer settings (`RUN`), so one compiled
program (cached per process by `get_program`) serves all of them; only the resharded test compiles a
second layout.
"""

import json
import os

import jax
import numpy as np
import pytest

from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.train.checkpoint import CheckpointError
from codesign.train.trainer import TrainError, build_mesh, get_program, restore_state, run_training
from codesign.train.validate import spearman
from codesign.train_step import OptimizerConfig
from tests.conftest import require_devices

RUN = {"global_batch": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 3, "schedule_steps": 30, "seed": 0}
FSDP = "fsdp=8,remat=full"


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
        cands.append({"rank": i + 1, "strategy": s.to_json(), "fits": True if fits is None else fits[i],
                      "memory_per_device_bytes": 1, "memory_capacity_bytes": 2, "step_time_s": t,
                      "tokens_per_s": 256 / t, "mfu": 0.1, "breakdown": {}, "evidence": "analytic", "reasons": []})
    doc = {"schema": "codesign.plan/v1", "model": {"name": "tiny-dense"}, "hardware": {"name": "cpu", "devices": devices},
           "workload": {"mode": "train", "global_batch": 8, "seq_len": 32, "dtype": "bfloat16"},
           "search": {}, "candidates": cands, "chosen": chosen}
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
def test_loss_decreases_over_30_steps(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_training("tiny-dense", strategy=FSDP, steps=30, metrics=str(metrics), **RUN)
    losses = _losses(r)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert r["devices"] == 8 and r["strategy"] == FSDP and r["final_step"] == 30
    # The compile step is excluded from throughput; later steps report tokens/s and (nominal) MFU.
    first, rest = r["steps"][0], r["steps"][1:]
    assert first["compile"] and first["tokens_per_s"] is None and first["mfu"] is None
    assert all(s["tokens_per_s"] > 0 and s["mfu"] > 0 and s["step_time_s"] > 0 for s in rest)
    assert r["mfu_basis"]["nominal"] is True and r["summary"]["timed_steps"] == 29
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31)) and lines[-1]["loss"] == losses[-1]


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path):
    ck = str(tmp_path / "ck")
    straight = run_training("tiny-dense", strategy=FSDP, steps=6, return_state=True, **RUN)
    first = run_training("tiny-dense", strategy=FSDP, steps=3, checkpoint_dir=ck, **RUN)
    assert first["checkpoint"] == [{"step": 3, "path": os.path.join(ck, "3")}]
    second = run_training("tiny-dense", strategy=FSDP, steps=6, checkpoint_dir=ck, resume=True,
                          return_state=True, **RUN)
    assert second["resumed_from"] == 3 and [s["step"] for s in second["steps"]] == [4, 5, 6]
    assert _losses(first) + _losses(second) == _losses(straight)  # exact equality
    assert _leaves_bytes(second["state"]) == _leaves_bytes(straight["state"])  # params and optimizer state


def test_resharded_restore_fsdp8_to_data2_tensor4(tmp_path):
    ck = str(tmp_path / "ck")
    saved = run_training("tiny-dense", strategy=FSDP, steps=2, checkpoint_dir=ck, return_state=True, **RUN)
    other = Strategy.parse("data=2,tensor=4,remat=full")
    cfg = get_preset("tiny-dense")
    opt = OptimizerConfig(learning_rate=RUN["lr"], warmup_steps=RUN["warmup_steps"], total_steps=30)
    prog = get_program(cfg, Workload(8, 32), other, build_mesh(other), opt)
    step, state, extra = restore_state(prog, ck)  # no init, no compile: read straight into the new layout
    assert step == 2 and extra["strategy"] == FSDP and extra["model_fingerprint"] == cfg.fingerprint()
    assert _leaves_bytes(state["params"]) == _leaves_bytes(saved["state"]["params"])
    assert _leaves_bytes(state["opt_state"]) == _leaves_bytes(saved["state"]["opt_state"])
    got = jax.tree.map(lambda x: x.sharding, state["params"])
    assert all(a.is_equivalent_to(b, x.ndim) for a, b, x in
               zip(jax.tree.leaves(got), jax.tree.leaves(prog.param_shardings), jax.tree.leaves(state["params"])))
    # And training continues under the new layout.
    cont = run_training("tiny-dense", strategy="data=2,tensor=4", steps=3, checkpoint_dir=ck, resume=True, **RUN)
    assert cont["resumed_from"] == 2 and [s["step"] for s in cont["steps"]] == [3]
    assert np.isfinite(cont["steps"][0]["loss"])


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
        run_training("tiny-dense", plan=str(path), steps=1)
    out = run_training("tiny-dense", plan=str(path), steps=1, attention="xla")
    assert out["attention"] == "xla"


def test_plan_device_mismatch(tmp_path):
    plan = _plan(tmp_path / "p4.json", [("fsdp=4,remat=full", 0.01)], devices=4)
    with pytest.raises(StrategyError, match="plan needs 4 devices, 8 attached"):
        run_training("tiny-dense", plan=plan, steps=1)
    with pytest.raises(StrategyError, match="--devices 4 given, but 8"):
        run_training("tiny-dense", strategy=FSDP, devices=4, steps=1, **RUN)
    with pytest.raises(StrategyError, match="pipeline schedules is not implemented"):
        run_training("tiny-dense", strategy="pipeline=2,fsdp=4", steps=1, **RUN)


def test_missing_token_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_training("tiny-dense", strategy=FSDP, steps=1, data=str(tmp_path / "none.bin"), **RUN)


def test_incompatible_checkpoint_leaves_directory_untouched(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    run_training("tiny-dense", strategy=FSDP, steps=1, checkpoint_dir=ck, **RUN)
    before = _tree_snapshot(ck)
    assert before
    for resume in (True, False):
        with pytest.raises(CheckpointError, match="architecture differs"):
            run_training("tiny-mla", strategy=FSDP, steps=2, checkpoint_dir=ck, resume=resume, **RUN)
    with pytest.raises(TrainError, match="pass --resume"):
        run_training("tiny-dense", strategy=FSDP, steps=2, checkpoint_dir=ck, **RUN)
    assert _tree_snapshot(ck) == before
    # Through the CLI: one clear line, exit status 2.
    from codesign.cli import main

    capsys.readouterr()
    rc = main(["train", "--model", "tiny-mla", "--strategy", FSDP, "--devices", "8", "--steps", "2",
               "--global-batch", "8", "--seq-len", "32", "--checkpoint-dir", ck, "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("codesign train: error: checkpoint directory")
    assert _tree_snapshot(ck) == before


def test_train_from_plan_cli_json(tmp_path, capsys):
    plan = _plan(tmp_path / "p.json", [(FSDP, 0.01)])
    from codesign.cli import main

    capsys.readouterr()
    rc = main(["train", "--model", "tiny-dense", "--plan", plan, "--devices", "8", "--steps", "2", "--lr", "1e-2",
               "--warmup-steps", "3", "--schedule-steps", "30", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON document
    assert rc == 0 and out["devices"] == 8 and out["strategy"] == FSDP and out["checkpoint"] == []
    assert [set(s) >= {"step", "loss", "tokens_per_s", "mfu", "step_time_s"} for s in out["steps"]] == [True, True]
    assert out["workload"]["global_batch"] == 8 and out["workload"]["seq_len"] == 32


# -- validate -------------------------------------------------------------------------------------------
def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks
    assert spearman([1], [2]) is None and spearman([1, 1], [1, 2]) is None


def test_validate_rows(tmp_path):
    from codesign.train.validate import run_validation

    plan = _plan(tmp_path / "p.json", [(FSDP, 0.02), ("pipeline=2,fsdp=4,remat=full", 0.025),
                                       ("data=2,tensor=4,remat=full", 0.03), ("fsdp=8,remat=none", 0.04)],
                 fits=[True, True, True, False])
    r = run_validation("tiny-dense", plan, top=2, steps=2, warmup=1)
    assert [row["spec"] for row in r["rows"]] == [FSDP, "data=2,tensor=4,remat=full"]
    for row in r["rows"]:
        assert set(row) >= {"spec", "estimated_step_time_s", "measured_step_time_s", "ratio"}
        assert row["measured_step_time_s"] > 0
        assert row["ratio"] == pytest.approx(row["measured_step_time_s"] / row["estimated_step_time_s"])
    assert abs(r["rank_correlation"]) == pytest.approx(1.0)  # two rows: the order agrees or not
    assert [s["spec"] for s in r["skipped"]] == ["pipeline=2,fsdp=4,remat=full"]

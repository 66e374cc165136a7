"""Two JAX processes x 4 CPU devices form one 8-device mesh (gloo collectives) and train exactly like
one process with 8 devices."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from codesign import _compat
from codesign.train.trainer import TrainRun, run_training
from tests.conftest import cpu_child_env, require_devices

pytestmark = pytest.mark.multiprocess

ARGS = [
    "--model",
    "tiny-dense",
    "--strategy",
    "fsdp=8,remat=full",
    "--devices",
    "8",
    "--steps",
    "5",
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
    "--seed",
    "0",
    "--json",
    "--no-progress",
]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    if not _compat.cpu_gloo_available():
        pytest.skip(
            "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives), so CPU processes "
            "cannot form one mesh"
        )
    require_devices(8)
    port = _free_port()
    env = cpu_child_env(4, drop_prefix="CODESIGN_")
    procs = []
    for pid in range(2):
        cmd = [
            sys.executable,
            "-m",
            "codesign",
            "train",
            *ARGS,
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
            "--init-timeout",
            "120",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"the 2-process run did not finish within {TIMEOUT_S}s")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process exited {p.returncode}:\n{err[-4000:]}"
    docs = [json.loads(out) for out, _ in outs]  # stdout is exactly one JSON document (gloo chatter moved)
    for d in docs:
        assert d["devices"] == 8 and d["process_count"] == 2
    multi = [s["loss"] for s in docs[0]["steps"]]
    assert multi == [s["loss"] for s in docs[1]["steps"]]

    # The same run in this (single) process with 8 devices.
    single = run_training(
        TrainRun(
            "tiny-dense",
            strategy="fsdp=8,remat=full",
            steps=5,
            global_batch=8,
            seq_len=32,
            lr=1e-2,
            warmup_steps=3,
            schedule_steps=30,
            seed=0,
        )
    )
    ref = [s["loss"] for s in single["steps"]]
    assert len(multi) == len(ref) == 5
    np.testing.assert_allclose(multi, ref, rtol=1e-6, atol=0)

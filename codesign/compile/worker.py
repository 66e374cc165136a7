"""Compile candidates in subprocesses: isolation from crashes, a hard timeout, parallelism.

`compile_in_subprocess` runs ``python -m codesign.compile.worker`` with one request as JSON on stdin.
The child's environment is set before JAX starts there: ``JAX_PLATFORMS=cpu``, for the cpu target
N emulated devices through `runtime.emulate_cpu_devices` (N = the devices actually compiled: the full mesh, or a
reduced data axis), silenced libtpu host discovery, and libtpu's multi-process lock lifted so that
parallel TPU compiles do not collide. The child writes the report JSON to the real stdout; anything
libraries print goes to stderr (fd 1 is pointed at fd 2 while it runs).

A crash (segfault, non-zero exit, unreadable output) becomes an `error` report carrying the tail of
the child's stderr (libtpu/absl noise lines filtered out); exceeding `timeout_s` kills the child's
whole process group and becomes a `timeout` report. `codesign.compile.measure` drives these
children (cache, reuse, executors, progress); `kill_running_workers` ends them all on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from codesign.config import ModelConfig, Workload
from codesign.hardware.catalog import Hardware

# Light imports only: this module is also the child's entry point, and JAX must not start before
# main() has configured the environment (the parent sets it too).
from codesign.report import CompileReport
from codesign.sharding.strategy import Strategy

_NOISE = re.compile(
    r"(^WARNING: Logging before InitGoogle|^E\d{4} .*(libtpu|tpu_|common_lib|host bounds|TPU_)|"
    r"^=== Source Location Trace|^learning/|^Failed to find host bounds|TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|"
    r"ALLOW_MULTIPLE_LIBTPU_LOAD|^I\d{4} |^W\d{4} .*(libtpu|tpu))"
)
STDERR_TAIL_LINES = 40
_RUNNING: set[subprocess.Popen] = set()  # live worker children, so that Ctrl-C can end them at once
_RUNNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class CompileRequest:
    cfg: ModelConfig
    workload: Workload
    strategy: Strategy
    hardware: Hardware
    target: str = "auto"
    save_hlo: str | None = None
    max_compile_devices: int | None = None
    # Overrides of the target's XLA flags (codesign.compile.flags); None: the platform's overlap defaults.
    xla_flags: tuple[tuple[str, str], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "cfg": self.cfg.to_json(),
            "workload": self.workload.to_json(),
            "strategy": self.strategy.to_json(),
            "hardware": self.hardware.to_json(),
            "target": self.target,
            "save_hlo": self.save_hlo,
            "max_compile_devices": self.max_compile_devices,
            "xla_flags": [list(kv) for kv in self.xla_flags] if self.xla_flags is not None else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompileRequest:
        return cls(
            cfg=ModelConfig.from_json(d["cfg"]),
            workload=Workload.from_json(d["workload"]),
            strategy=Strategy.from_json(d["strategy"]),
            hardware=Hardware.from_json(d["hardware"]),
            target=d.get("target", "auto"),
            save_hlo=d.get("save_hlo"),
            max_compile_devices=d.get("max_compile_devices"),
            xla_flags=tuple((k, v) for k, v in d["xla_flags"]) if d.get("xla_flags") is not None else None,
        )


def filter_noise(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip() and not _NOISE.search(line))


def _tail(text: str, n: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(filter_noise(text).splitlines()[-n:])


def child_env(req: CompileRequest, target: str) -> dict[str, str]:
    """The child's environment, fixed before its JAX starts."""
    from codesign.compile.targets import plan_compile
    from codesign.runtime import accelerator_present, emulate_cpu_devices

    env = dict(os.environ)
    if target != "attached":  # deviceless and emulated compiles never touch an accelerator
        env["JAX_PLATFORMS"] = "cpu"
    elif env.get("JAX_PLATFORMS") == "cpu" and accelerator_present():
        # The planning process pinned itself to the host CPU (runtime.configure); the attached target
        # must see the real devices, so its worker does not inherit that pin.
        env.pop("JAX_PLATFORMS")
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    if target == "tpu":
        env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    n = 1
    if target == "cpu":
        try:
            n = plan_compile(
                req.cfg, req.workload, req.strategy, target, req.hardware, req.max_compile_devices
            ).n_devices
        except ValueError:
            n = 1  # the child reports the planning error itself
    emulate_cpu_devices(env, n)
    # The child must import this very codesign (a checkout run without installing it, too).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def compile_in_subprocess(
    cfg: ModelConfig,
    workload: Workload,
    strategy: Strategy,
    hardware: Hardware,
    target: str = "auto",
    timeout_s: float = 600.0,
    save_hlo: str | None = None,
    max_compile_devices: int | None = None,
    xla_flags: tuple[tuple[str, str], ...] | None = None,
) -> CompileReport:
    """`compile_candidate` in a fresh Python process; never raises for the candidate."""
    from codesign.compile.devices import TargetError
    from codesign.compile.targets import resolve_target

    try:
        target = resolve_target(target, hardware)
    except TargetError as e:
        return CompileReport(outcome="error", target=str(target), stage="build", message=str(e))
    req = CompileRequest(cfg, workload, strategy, hardware, target, save_hlo, max_compile_devices, xla_flags)
    env = child_env(req, target)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codesign.compile.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        text=True,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        out, err = proc.communicate(json.dumps(req.to_json()), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return CompileReport(
            outcome="timeout",
            target=target,
            stage="compile",
            compile_s=time.perf_counter() - t0,
            message=f"compile exceeded {timeout_s:g} s; the worker's process group was killed"
            + (f"\n{_tail(err, 10)}" if _tail(err, 10) else ""),
            full_mesh=strategy.mesh,
        )
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    wall = time.perf_counter() - t0

    if proc.returncode != 0:
        rc = proc.returncode
        what = (
            f"killed by signal {signal.Signals(-rc).name}"
            if rc < 0 and -rc in signal.valid_signals()
            else f"exit status {rc}"
        )
        return CompileReport(
            outcome="error",
            target=target,
            stage="compile",
            compile_s=wall,
            message=f"compile worker crashed ({what}); stderr tail:\n{_tail(err)}",
            full_mesh=strategy.mesh,
        )
    try:
        return CompileReport.from_json(json.loads(out.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001
        return CompileReport(
            outcome="error",
            target=target,
            stage="analyze",
            compile_s=wall,
            message=f"compile worker returned no readable report ({type(e).__name__}: {e}); "
            f"stdout tail: {out[-500:]!r}; stderr tail:\n{_tail(err)}",
            full_mesh=strategy.mesh,
        )


def kill_running_workers() -> None:
    """End every live worker child (and its process group) now: Ctrl-C must not wait for compiles."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------- child


def main() -> int:
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever libraries print goes to stderr; only the report goes to the real stdout
    sys.stdout = sys.stderr
    from codesign import runtime

    runtime.silence_tpu_runtime_noise()
    req = CompileRequest.from_json(json.loads(sys.stdin.read()))
    from codesign.compile.targets import compile_candidate

    report = compile_candidate(
        req.cfg,
        req.workload,
        req.strategy,
        req.hardware,
        req.target,
        save_hlo=req.save_hlo,
        max_compile_devices=req.max_compile_devices,
        xla_flags=req.xla_flags,
    )
    real_stdout.write(json.dumps(report.to_json(), default=str) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""On-disk cache of `CompileReport`s, safe for several planners writing at once.

Key: sha256 over the model's architecture (`ModelConfig.fingerprint()`), the workload, the strategy
spec, the resolved target, `max_compile_devices`, the hardware fields a compile depends on (name,
platform, chip, HBM and its reserve, TPU generation), the compiler stack's versions (jax, jaxlib,
libtpu, the CUDA plugin) and a digest of codesign's own compile/analysis sources (a fixed HLO walker
must not serve stale numbers).

One entry = one JSON file ``<dir>/<key[:2]>/<key>.json`` holding ``{"key", "checksum", "report"}``,
written to a temp file in the same directory and `os.replace`d (atomic on POSIX and Windows). A
corrupt or truncated entry (bad JSON, wrong key, checksum mismatch, unreadable report) is deleted and
counts as a miss, so the caller recompiles. `timeout` outcomes are never stored (a rerun with more
time may succeed); ok, oom and error are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from codesign.compile.report import CompileReport
from codesign.config import ModelConfig, Workload
from codesign.hardware.catalog import Hardware
from codesign.sharding.strategy import Strategy

CACHE_SCHEMA = "codesign.compile-cache/v1"
_SOURCES = ("compile/targets.py", "compile/hlo.py", "compile/hlo_parse.py", "compile/xla_cost.py",
            "compile/report.py", "train_step.py")


def default_cache_dir() -> Path:
    env = os.environ.get("CODESIGN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codesign" / "compile"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    h = hashlib.sha256()
    root = resources.files("codesign")
    for rel in _SOURCES:
        try:
            h.update(root.joinpath(rel).read_bytes())
        except (FileNotFoundError, OSError):
            h.update(rel.encode())
    return h.hexdigest()[:16]


def hardware_key(hardware: Hardware) -> dict[str, Any]:
    """The hardware fields that change what a compile reports (network levels do not)."""
    return {"name": hardware.name, "platform": hardware.platform, "chip": hardware.chip.name,
            "hbm_bytes": hardware.hbm_bytes, "memory_reserve_bytes": hardware.memory_reserve_bytes,
            "tpu_generation": hardware.tpu_generation}


def cache_key(cfg: ModelConfig, workload: Workload, strategy: Strategy, target: str, hardware: Hardware,
              max_compile_devices: int | None = None, extra: dict[str, Any] | None = None) -> str:
    """`target` must be resolved (not "auto"): auto may mean another compiler on another machine."""
    from codesign.compile.targets import versions

    if target == "auto":
        raise ValueError("cache_key needs a resolved target; call resolve_target(target, hardware) first")
    payload = {"schema": CACHE_SCHEMA, "model": cfg.fingerprint(), "workload": workload.to_json(),
               "strategy": strategy.spec, "target": target, "max_compile_devices": max_compile_devices,
               "hardware": hardware_key(hardware), "versions": versions(), "code": _code_digest(),
               "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(report_json: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(report_json, sort_keys=True, default=str).encode()).hexdigest()


class CompileCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0  # entries found damaged and deleted (each also counts as a miss)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> CompileReport | None:
        p = self.path(key)
        try:
            raw = p.read_text()
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        except OSError:
            self.misses += 1
            return None
        try:
            entry = json.loads(raw)
            if entry.get("key") != key or entry.get("checksum") != _checksum(entry["report"]):
                raise ValueError("key or checksum mismatch")
            report = CompileReport.from_json(entry["report"])
        except Exception:  # noqa: BLE001 - any damage means: drop it and recompile
            self.corrupt += 1
            self.misses += 1
            try:
                p.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        return report

    def put(self, key: str, report: CompileReport) -> bool:
        """Store a report (atomically); returns False for outcomes that are never cached (timeout)."""
        if report.outcome == "timeout":
            return False
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        rj = report.to_json()
        data = json.dumps({"key": key, "checksum": _checksum(rj), "report": rj}, default=str)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return True

    def clear(self) -> None:
        for f in self.directory.glob("*/*.json"):
            try:
                f.unlink()
            except OSError:
                pass

    @property
    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}


def compile_cached(cfg: ModelConfig, workload: Workload, strategy: Strategy, hardware: Hardware,
                   target: str = "auto", *, cache: CompileCache | None,
                   compile_fn: Callable[..., CompileReport] | None = None,
                   max_compile_devices: int | None = None, **kw: Any) -> CompileReport:
    """A cached compile: look up, else compile with `compile_fn` (default: in-process
    `compile_candidate`; pass `worker.compile_in_subprocess` for isolation) and store the result."""
    from codesign.compile.targets import compile_candidate, resolve_target

    target = resolve_target(target, hardware)
    fn = compile_fn or compile_candidate
    if cache is None:
        return fn(cfg, workload, strategy, hardware, target, max_compile_devices=max_compile_devices, **kw)
    key = cache_key(cfg, workload, strategy, target, hardware, max_compile_devices)
    hit = cache.get(key)
    if hit is not None:
        return hit
    report = fn(cfg, workload, strategy, hardware, target, max_compile_devices=max_compile_devices, **kw)
    cache.put(key, report)
    return report

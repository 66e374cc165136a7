"""On-disk cache of `CompileReport`s, safe for several planners writing at once.

Key: sha256 over the model's architecture (`ModelConfig.fingerprint()`), the workload, the strategy
spec, the resolved target, `max_compile_devices`, the hardware fields a compile depends on (name,
platform, chip, HBM and its reserve, TPU generation), the compiler stack's versions (jax, jaxlib,
libtpu, the CUDA plugin), the XLA flags in force (`XLA_FLAGS`, `LIBTPU_INIT_ARGS`; the emulated
device count is left out, since the worker sets it per request), the target's own XLA flags
(`codesign.compile.flags.resolve_flags`: the platform's overlap defaults with the request's overrides)
and a digest of the source of the
whole `codesign` package: a change to a model, a rule, a remat policy or the HLO walker changes the
compiled program or its reading, so it must never be served an old report.

One entry = one JSON file ``<dir>/<key[:2]>/<key>.json`` holding ``{"key", "checksum", "report"}``,
written to a temp file in the same directory and `os.replace`d (atomic on POSIX and Windows). A
corrupt or truncated entry (bad JSON, non-UTF-8 bytes, wrong key, checksum mismatch, unreadable
report) is deleted and counts as a miss, so the caller recompiles. `timeout` outcomes are never stored (a rerun with more
time may succeed); ok, oom and error are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from codesign.compile.flags import resolve_flags
from codesign.compile.worker import CompileRequest
from codesign.hardware.catalog import Hardware
from codesign.report import CompileReport

CACHE_SCHEMA = "codesign.compile-cache/v2"
_FLAG_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


def default_cache_dir() -> Path:
    env = os.environ.get("CODESIGN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codesign" / "compile"


def source_digest(root: str | os.PathLike | None = None) -> str:
    """sha256 over every source and data file of the package at `root` (default: this codesign)."""
    base = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(base.rglob("*")):
        if (
            path.is_file()
            and path.suffix in (".py", ".yaml", ".json", ".txtpb", ".txt")
            and "__pycache__" not in path.parts
        ):
            h.update(path.relative_to(base).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    return source_digest()


def xla_flags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The compiler flags in force (`env`, default os.environ), as they shape the compiled program
    (device count excluded)."""
    env = os.environ if env is None else env
    out = {}
    for name in _FLAG_ENV:
        value = " ".join(_DEVICE_COUNT_FLAG.sub("", env.get(name, "")).split())
        if value:
            out[name] = value
    return out


def hardware_key(hardware: Hardware) -> dict[str, Any]:
    """The hardware fields that change what a compile reports (network levels do not; a requested TPU
    slice count does: the deviceless compile runs on that many slices)."""
    key = {
        "name": hardware.name,
        "platform": hardware.platform,
        "chip": hardware.chip.name,
        "hbm_bytes": hardware.hbm_bytes,
        "memory_reserve_bytes": hardware.memory_reserve_bytes,
        "tpu_generation": hardware.tpu_generation,
    }
    if hardware.slices:  # only when asked for, so keys of single-slice compiles stay as they were
        key["slices"] = hardware.slices
    return key


def cache_key(req: CompileRequest, *, code: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The request's target must be resolved (not "auto"): auto may mean another compiler elsewhere."""
    from codesign.compile.targets import versions

    if req.target == "auto":
        raise ValueError("cache_key needs a resolved target; call resolve_target(target, hardware) first")
    payload = {
        "schema": CACHE_SCHEMA,
        "model": req.cfg.fingerprint(),
        "workload": req.workload.to_json(),
        "strategy": req.strategy.spec,
        "target": req.target,
        "max_compile_devices": req.max_compile_devices,
        "hardware": hardware_key(req.hardware),
        "versions": versions(),
        "flags": xla_flags(env),
        "target_flags": resolve_flags(
            req.target, req.hardware.platform, req.xla_flags, req.hardware.tpu_generation
        ),
        "code": code or _code_digest(),
    }
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
            raw = p.read_bytes()
        except OSError:  # missing, a directory, unreadable: a miss either way
            self.misses += 1
            return None
        try:
            entry = json.loads(raw.decode("utf-8"))
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
        """Store a report (atomically); False for outcomes never cached (timeout) or an unwritable cache
        (a cache that cannot be written must not end a search: the report is still returned)."""
        if report.outcome == "timeout":
            return False
        p = self.path(key)
        rj = report.to_json()
        data = json.dumps({"key": key, "checksum": _checksum(rj), "report": rj}, default=str)
        tmp = None
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=p.parent)
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            return True
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False

    def clear(self) -> None:
        for f in self.directory.glob("*/*.json"):
            try:
                f.unlink()
            except OSError:
                pass

    @property
    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}

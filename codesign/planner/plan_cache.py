"""On-disk cache of whole plans, beside the compile cache: a rerun of the same request is a file read.

Key: sha256 over everything the search reads (model fingerprint, workload, the full hardware profile,
device count, resolved target and every search option of the `PlanRequest`) and the digest of the
codesign source (`compile.cache.source_digest`: changed code never serves an old plan). A request
that reuses reports from other plans or keeps no cache is not cached. A damaged entry is a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from codesign.compile.cache import _code_digest, default_cache_dir, xla_flags
from codesign.plan_file import Plan
from codesign.userfiles import finite_json

SCHEMA = "codesign.plan-cache/v1"
_NOT_KEYED = ("cfg", "hardware", "workload", "reuse", "progress", "workers", "cache_dir", "use_cache")


def plan_key(req: Any, target: str) -> str | None:
    """The cache key of a `PlanRequest` on `target` (None: this request is not cached)."""
    if not req.use_cache or req.reuse:
        return None
    options = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name not in _NOT_KEYED}
    doc = {
        "schema": SCHEMA,
        "code": _code_digest(),
        "xla_flags": xla_flags(),
        "model": req.cfg.fingerprint(),
        "workload": req.workload.to_json(),
        "hardware": req.hardware.to_json(),
        "target": target,
        "options": options,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode()).hexdigest()


def _path(cache_dir: str | None, key: str) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "plans" / f"{key}.json"


def load(cache_dir: str | None, key: str) -> Plan | None:
    try:
        entry = json.loads(_path(cache_dir, key).read_text())
        if entry.get("key") != key:
            return None
        plan = Plan.from_json(entry["plan"])
        plan.scored = entry["scored"]
        return plan
    except Exception:  # noqa: BLE001 - missing or damaged: search again
        return None


def store(cache_dir: str | None, key: str, plan: Plan) -> None:
    path = _path(cache_dir, key)
    doc, _ = finite_json({"key": key, "plan": plan.to_json(), "scored": plan.scored})
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next rerun
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".json")
        with os.fdopen(fd, "w") as f:  # dumps, not dump: one C-encoder call (json.dump is pure Python)
            f.write(json.dumps(doc, allow_nan=False))
        os.replace(tmp, path)

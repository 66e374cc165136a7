"""The `codesign.plan/v1` plan file (INTERFACE.md): written by `plan`, read by train/validate/compile."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from codesign.config import ConfigError, Workload
from codesign.userfiles import finite_json

PLAN_SCHEMA = "codesign.plan/v1"
_WORKLOAD_FIELDS = {f.name for f in dataclasses.fields(Workload)}


@dataclass
class Plan:
    model: dict[str, Any]
    hardware: dict[str, Any]
    workload: dict[str, Any]
    search: dict[str, Any]
    candidates: list[dict[str, Any]]
    chosen: int | None
    explanation: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    scored: list[dict[str, Any]] = field(default_factory=list)  # every analytic point (for --plot); not saved

    @property
    def best(self) -> dict[str, Any] | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "hardware": self.hardware,
            "workload": self.workload,
            "search": {**self.search, "rejected": self.rejected},
            "candidates": self.candidates,
            "chosen": self.chosen,
            "explanation": self.explanation,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        """The inverse of `to_json` (the analytic point cloud `scored` is not saved, so it comes back empty)."""
        search = dict(d["search"])
        rejected = search.pop("rejected", {})
        return cls(
            model=d["model"],
            hardware=d["hardware"],
            workload=d["workload"],
            search=search,
            candidates=d["candidates"],
            chosen=d["chosen"],
            explanation=list(d.get("explanation", [])),
            rejected=rejected,
        )

    def save(self, path: str) -> None:
        """Atomic write: an interrupted save never leaves a half-written plan behind. Strict JSON (a
        non-finite number is null), with the permissions the user's umask gives a new file (mkstemp
        alone would leave it 0600, unreadable to the rest of a team)."""
        d = os.path.dirname(os.path.abspath(path))
        doc, _ = finite_json(self.to_json())
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".plan-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, allow_nan=False)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_PLAN_FIX = "create a plan with `codesign plan ... --out FILE`"


def load_plan(path: str) -> dict[str, Any]:
    """The plan document in `path`, checked: every failure is one `ConfigError` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {path!r} not found; {_PLAN_FIX}") from None
    except OSError as e:
        raise ConfigError(f"cannot read plan file {path!r}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"plan file {path!r} is not UTF-8 text (bad byte at offset {e.start}); {_PLAN_FIX}"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"plan file {path!r} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); {_PLAN_FIX}"
        ) from None
    except RecursionError:
        raise ConfigError(f"plan file {path!r} is nested too deeply to be a plan; {_PLAN_FIX}") from None
    problem = plan_problem(data)
    if problem:
        raise ConfigError(f"plan file {path!r}: {problem}; {_PLAN_FIX}")
    return data


def plan_problem(data: Any) -> str | None:
    """What makes `data` unusable as a plan (None when train, validate and compile can read it)."""
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not a {PLAN_SCHEMA} object"
    if data.get("schema") != PLAN_SCHEMA:
        return f"has schema {data.get('schema')!r:.60}; expected {PLAN_SCHEMA!r}"
    cands = data.get("candidates")
    if not isinstance(cands, list) or not cands:
        return "has no candidates"
    for i, c in enumerate(cands):
        spec = (
            c.get("strategy", {}).get("spec")
            if isinstance(c, dict) and isinstance(c.get("strategy"), dict)
            else None
        )
        if not isinstance(spec, str):
            return f"candidate {i} has no strategy.spec string"
        if c.get("step_time_s") is not None and not _is_number(c["step_time_s"]):
            return f"candidate {i} has step_time_s {c['step_time_s']!r:.40}, not a number"
    chosen = data.get("chosen")
    if chosen is not None and (
        not isinstance(chosen, int) or isinstance(chosen, bool) or not 0 <= chosen < len(cands)
    ):
        return f"chosen is {chosen!r:.40}, but it must index candidates (0..{len(cands) - 1}) or be null"
    workload = data.get("workload", {})
    if not isinstance(workload, dict):
        return "workload is not an object"
    for key in ("global_batch", "seq_len"):
        v = workload.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return f"workload.{key} is {v!r:.40}; it must be a positive integer"
    for key in ("mode", "dtype", "param_dtype", "attention"):
        if key in workload and not isinstance(workload[key], str):
            return f"workload.{key} is {workload[key]!r:.40}; it must be a string"
    try:
        Workload(**{k: v for k, v in workload.items() if k in _WORKLOAD_FIELDS and k != "mode"})
    except ConfigError as e:
        return f"workload: {e}"
    if not isinstance(data.get("model", {}), dict) or not isinstance(data.get("hardware", {}), dict):
        return "model and hardware must be objects"
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def chosen_candidate(data: dict[str, Any]) -> dict[str, Any]:
    idx = data.get("chosen")
    if idx is None:
        raise ConfigError(
            "the plan has no candidate that fits (chosen is null); re-plan with more devices "
            "or a smaller batch"
        )
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(data.get("candidates") or []):
        raise ConfigError(f"the plan's chosen is {idx!r}, not an index into its candidates; re-plan")
    return data["candidates"][idx]

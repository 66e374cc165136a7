"""The `codesign.plan/v1` plan file (INTERFACE.md): written by `plan`, read by train/validate/compile."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from codesign.config import ConfigError

PLAN_SCHEMA = "codesign.plan/v1"


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
        return {"schema": PLAN_SCHEMA, "model": self.model, "hardware": self.hardware, "workload": self.workload,
                "search": {**self.search, "rejected": self.rejected}, "candidates": self.candidates,
                "chosen": self.chosen, "explanation": self.explanation}

    def save(self, path: str) -> None:
        """Atomic write: an interrupted save never leaves a half-written plan behind."""
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".plan-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)


def load_plan(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {path!r} not found; create one with `codesign plan ... --out {path}`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"plan file {path!r} is not valid JSON: {e}") from None
    if data.get("schema") != PLAN_SCHEMA:
        raise ConfigError(f"plan file {path!r} has schema {data.get('schema')!r}; expected {PLAN_SCHEMA!r}")
    if not data.get("candidates"):
        raise ConfigError(f"plan file {path!r} has no candidates")
    return data


def chosen_candidate(data: dict[str, Any]) -> dict[str, Any]:
    idx = data.get("chosen")
    if idx is None:
        raise ConfigError("the plan has no candidate that fits (chosen is null); re-plan with more devices "
                          "or a smaller batch")
    return data["candidates"][idx]

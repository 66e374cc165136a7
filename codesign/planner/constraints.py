"""User constraints on the search: `--strategy-filter "tensor<=8,pipeline=1"` and `--fix remat=full`."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from codesign.axes import MESH_AXES
from codesign.sharding.strategy import Strategy, StrategyError

_OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_TEXT_KEYS = ("remat", "schedule")  # compared as words (= and != only); the rest as integers
_KEYS = MESH_AXES + _TEXT_KEYS + ("microbatches", "v")
_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|!=|==|=|<|>)\s*([A-Za-z0-9_]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str
    value: str

    def __call__(self, s: Strategy) -> bool:
        knobs = {
            "remat": s.remat,
            "schedule": s.schedule,
            "microbatches": s.microbatches,
            "v": s.stages_per_device,
        }
        have = knobs[self.key] if self.key in knobs else s.sizes[self.key]
        want = self.value if self.key in _TEXT_KEYS else int(self.value)
        if self.key in _TEXT_KEYS and self.op not in ("=", "==", "!="):
            raise StrategyError(f"{self.key} supports only = and != in filters, got {self.op}")
        return _OPS[self.op](have, want)

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_constraints(text: str | None) -> tuple[Constraint, ...]:
    out = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        m = _PATTERN.match(item)
        if not m:
            raise StrategyError(
                f"cannot parse constraint {item!r}; write e.g. tensor<=8, pipeline=1, remat!=none"
            )
        key, op, value = m.groups()
        if key not in _KEYS:
            raise StrategyError(f"constraint {item!r}: unknown key {key!r}; keys are {', '.join(_KEYS)}")
        if key not in _TEXT_KEYS and not value.isdigit():
            raise StrategyError(f"constraint {item!r}: {key} takes an integer")
        out.append(Constraint(key, op, value))
    return tuple(out)


def parse_fix(text: str | None) -> tuple[Constraint, ...]:
    """`--fix remat=full,tensor=8`: knobs the user has already decided (equality constraints)."""
    cons = parse_constraints(text)
    for c in cons:
        if c.op not in ("=", "=="):
            raise StrategyError(f"--fix takes key=value pairs, got {c}")
    return cons

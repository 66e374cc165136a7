"""`MeshSpec`: ordered named mesh axes with sizes, and the real `Mesh` built from devices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jax.sharding import Mesh

from codesign import _compat
from codesign.sharding.strategy import Strategy, StrategyError


@dataclass(frozen=True)
class MeshSpec:
    axes: tuple[tuple[str, int], ...]  # outermost first: the last axis varies fastest in device order

    @classmethod
    def from_strategy(cls, strategy: Strategy, drop: Sequence[str] = ()) -> MeshSpec:
        """`drop` removes axes handled outside the SPMD mesh (e.g. a closed-form stage's mesh)."""
        return cls(tuple((a, n) for a, n in strategy.mesh if a not in drop))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for _, n in self.axes)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def build(self, devices: Sequence[Any]) -> Mesh:
        """A Mesh over the first `size` devices, in the order given (Auto axis types)."""
        devices = list(devices)
        if len(devices) < self.size:
            raise StrategyError(
                f"mesh {self.describe()} needs {self.size} devices but only {len(devices)} are available; "
                f"pass --devices {self.size} (CPU emulation) or pick a strategy whose sizes multiply to "
                f"{len(devices)}"
            )
        return _compat.make_mesh(devices[: self.size], self.shape, self.names)

    def describe(self) -> str:
        return "x".join(f"{a}={n}" for a, n in self.axes if n > 1) or "single device"

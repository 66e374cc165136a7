"""`MeshSpec`: ordered named mesh axes with sizes, and the real `Mesh` built from devices.

Devices that report more than one `slice_index` (attached TPU multi-slice) get a hybrid mesh from
`jax.experimental.mesh_utils.create_hybrid_device_mesh`: each axis is split into its part inside a
slice (ICI, laid out by `create_device_mesh` on the slice's physical torus) and its part across slices
(DCN), as `codesign.sharding.slices.slice_split` places it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jax.sharding import Mesh

from codesign import _compat
from codesign.sharding.slices import slice_split
from codesign.sharding.strategy import Strategy, StrategyError


@dataclass(frozen=True)
class MeshSpec:
    axes: tuple[tuple[str, int], ...]  # outermost first: the last axis varies fastest in device order

    @classmethod
    def from_strategy(cls, strategy: Strategy, drop: Sequence[str] = ()) -> MeshSpec:
        """`drop` removes axes handled outside the SPMD mesh (pipeline stages compile one stage)."""
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

    def build(self, devices: Sequence[Any], hybrid: bool = True) -> Mesh:
        """A Mesh over the first `size` devices (Auto axis types): in the order given, or, when they
        span several slices and `hybrid`, the hybrid ICI x DCN mesh (`hybrid_shapes`)."""
        devices = list(devices)
        if len(devices) < self.size:
            raise StrategyError(
                f"mesh {self.describe()} needs {self.size} devices but only {len(devices)} are available; "
                f"pass --devices {self.size} (CPU emulation) or pick a strategy whose sizes multiply to "
                f"{len(devices)}"
            )
        devices = devices[: self.size]
        slices = slice_count(devices)
        if hybrid and slices > 1:
            ici, dcn = self.hybrid_shapes(slices)
            grid = _compat.create_hybrid_device_mesh(ici, dcn, devices)
            return _compat.make_mesh(list(grid.flat), self.shape, self.names)
        return _compat.make_mesh(devices, self.shape, self.names)

    def hybrid_shapes(self, slices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ici shape, dcn shape) of this mesh over `slices` slices, for create_hybrid_device_mesh;
        raises SliceError when an axis other than data/fsdp/pipeline would cross slices."""
        split = slice_split(self.axes, slices)
        return tuple(split[a][0] for a in self.names), tuple(split[a][1] for a in self.names)

    def describe(self) -> str:
        return "x".join(f"{a}={n}" for a, n in self.axes if n > 1) or "single device"


def check_slices(mesh: Sequence[tuple[str, int]], devices: Sequence[Any], slices: int | None) -> int:
    """The slice count a run on `devices` uses (`--slices`, else what the devices report), after
    checking that the mesh lays over it (SliceError) and that attached multi-slice devices agree.
    Emulated CPU devices report no slices: `--slices K` then checks the layout only (their plain mesh
    has the same block structure as the hybrid one)."""
    attached = slice_count(devices)
    if slices is None:
        slices = attached
    elif attached > 1 and attached != slices:
        raise StrategyError(
            f"--slices {slices} given, but the attached devices report {attached} slices; "
            f"pass --slices {attached} or leave it out"
        )
    if slices > 1:
        slice_split(mesh, slices)
    return slices


def slice_count(devices: Sequence[Any]) -> int:
    """Distinct `slice_index` values among the devices (1 when they carry none: GPUs, CPUs)."""
    return len({getattr(d, "slice_index", 0) for d in devices}) or 1

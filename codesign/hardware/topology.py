"""TPU slice topologies: the libtpu topology name, the torus dims and which dims wrap around.

Rules (from the scaling book, "How to Think About TPUs", and the Google Cloud TPU docs):

- v4 / v5p are 3D tori built from 4x4x4 cubes joined by optical switches. A slice that is a whole number
  of cubes (every dim a multiple of 4, >= 64 chips) wraps around on every dim; smaller slices (2x2x1,
  2x2x2, 2x2x4, 2x4x4) have no wraparound ("a 2x2x4 won't have any wraparounds"). Pod limits: v4
  16x16x16 (4096 chips), v5p 16x20x28 (8960 chips).
- v5e / v6e are 2D, at most one 16x16 pod (256 chips); a dim wraps only when it is a full 16.

Naming: 3D shapes are written largest dim first ("v5p:8x8x4" for 256 chips, the form this project's
design notes use); 2D shapes use the Cloud names ("v5e:2x4", "v5e:8x16"). `torus_dims` follow the name's
order, which is libtpu's (x, y, z): x varies fastest over device ids, so the cost model maps the innermost
mesh axis onto the first dims. libtpu accepts any of these names for deviceless compiles (checked with
libtpu 0.0.52); note that its v4 topologies expose 2 devices (TensorCores) per chip.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

# generation -> (number of torus dims, pod dims sorted descending)
_POD = {
    "v4": (3, (16, 16, 16)),
    "v5p": (3, (28, 20, 16)),
    "v5e": (2, (16, 16)),
    "v6e": (2, (16, 16)),
}
# Slices below one 4x4x4 cube (3D) and the Cloud 2D shapes. 1- and 2-chip 3D shapes are not Cloud
# offerings but libtpu compiles for them, which keeps small tests cheap.
_SMALL_3D = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (4, 2, 2), 32: (4, 4, 2)}
_SHAPES_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}

TPU_GENERATIONS = tuple(_POD)


class TopologyError(ValueError):
    """A TPU generation or chip count that has no slice shape; the message names nearby valid counts."""


@dataclass(frozen=True)
class SliceTopology:
    generation: str
    dims: tuple[int, ...]  # torus dims in libtpu (x, y, z) order
    wraps: tuple[bool, ...]  # per dim: has a wraparound link

    @property
    def n_chips(self) -> int:
        return math.prod(self.dims)

    @property
    def name(self) -> str:
        return f"{self.generation}:" + "x".join(str(d) for d in self.dims)


def _check_generation(generation: str) -> int:
    if generation not in _POD:
        raise TopologyError(f"unknown TPU generation {generation!r}; known: {list(_POD)}")
    return _POD[generation][0]


def _cube_shape(generation: str, n_chips: int) -> tuple[int, ...] | None:
    """The most cubic shape of whole 4x4x4 cubes within the pod, largest dim first (None if none)."""
    if n_chips % 64:
        return None
    pod = _POD[generation][1]
    best = None
    k = n_chips // 64
    for a in range(1, pod[0] // 4 + 1):
        for b in range(1, min(a, pod[1] // 4) + 1):
            c, rem = divmod(k, a * b)
            if rem or c < 1 or c > b or c > pod[2] // 4:
                continue
            shape = (4 * a, 4 * b, 4 * c)
            key = (shape[0] / shape[2], shape)  # most cubic first; ties: the smaller leading dim
            if best is None or key < best[0]:
                best = (key, shape)
    return None if best is None else best[1]


def _shape(generation: str, n_chips: int) -> tuple[int, ...] | None:
    if _check_generation(generation) == 2:
        return _SHAPES_2D.get(n_chips)
    if n_chips in _SMALL_3D:
        return _SMALL_3D[n_chips]
    return _cube_shape(generation, n_chips)


def _wraps(generation: str, dims: tuple[int, ...]) -> tuple[bool, ...]:
    if len(dims) == 2:
        return tuple(d == 16 for d in dims)
    full_cubes = math.prod(dims) >= 64 and all(d % 4 == 0 for d in dims)
    return tuple(full_cubes and d > 1 for d in dims)


def max_slice_chips(generation: str) -> int:
    _check_generation(generation)
    return math.prod(_POD[generation][1])


def valid_slice_sizes(generation: str) -> list[int]:
    """Every chip count that has a slice shape for this generation, ascending."""
    if _check_generation(generation) == 2:
        return sorted(_SHAPES_2D)
    pod = _POD[generation][1]
    cubes = {64 * a * b * c for a, b, c in itertools.product(*(range(1, p // 4 + 1) for p in pod))}
    return sorted(set(_SMALL_3D) | cubes)


def _nearby(generation: str, n_chips: int) -> str:
    sizes = valid_slice_sizes(generation)
    below = [s for s in sizes if s < n_chips][-2:]
    above = [s for s in sizes if s > n_chips][:2]
    return ", ".join(str(s) for s in below + above)


def tpu_slice(generation: str, n_chips: int) -> SliceTopology:
    """The slice shape for n_chips of a generation (torus dims and wraparound per dim)."""
    if n_chips < 1:
        raise TopologyError(f"a TPU slice needs at least 1 chip, got {n_chips}")
    dims = _shape(generation, n_chips)
    if dims is None:
        limit = max_slice_chips(generation)
        extra = (
            f" (a {generation} slice holds at most {limit} chips; more need several slices over DCN)"
            if n_chips > limit
            else ""
        )
        raise TopologyError(
            f"no {generation} slice has {n_chips} chips{extra}; nearby valid counts: "
            f"{_nearby(generation, n_chips)}"
        )
    return SliceTopology(generation, dims, _wraps(generation, dims))


def tpu_topology_name(generation: str, n_chips: int) -> str:
    """The libtpu topology string, e.g. ("v5p", 256) -> "v5p:8x8x4", ("v5e", 8) -> "v5e:2x4"."""
    return tpu_slice(generation, n_chips).name


def split_slices(generation: str, n_chips: int, slices: int = 0) -> tuple[SliceTopology, int]:
    """(slice, number of slices) for n_chips. slices=K > 0: K equal slices (multi-slice over DCN, as
    `--slices K` asks). slices=0: one slice when one fits, else the largest slice size that divides
    n_chips."""
    if slices:
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
            raise TopologyError(f"slices must be a positive whole number, got {slices!r}")
        if n_chips % slices:
            raise TopologyError(
                f"{n_chips} chips do not split into {slices} equal slices; use a slice count that "
                f"divides {n_chips}"
            )
        try:
            return tpu_slice(generation, n_chips // slices), slices
        except TopologyError as e:
            raise TopologyError(f"{slices} slices of {n_chips // slices} chips: {e}") from None
    try:
        return tpu_slice(generation, n_chips), 1
    except TopologyError:
        if n_chips <= max_slice_chips(generation):
            raise
    for size in reversed(valid_slice_sizes(generation)):
        if n_chips % size == 0:
            return tpu_slice(generation, size), n_chips // size
    raise TopologyError(f"{n_chips} {generation} chips cannot be split into equal slices")  # pragma: no cover

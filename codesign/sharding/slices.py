"""TPU multi-slice: which part of each mesh axis runs across slices (over DCN), and which layouts may.

A multi-slice mesh is numbered slice-major: slice 0's chips first, then slice 1's, and the mesh is
row-major over them, outermost axis first (`jax.experimental.mesh_utils.create_hybrid_device_mesh`
builds the same block structure: each axis is `dcn part x ici part`, the DCN index outermost). So the
slice boundary falls on the outermost axes: walking from the innermost axis outwards, an axis whose
span (stride x size) passes one slice's devices has its outer part across slices.

Only `data`, `fsdp` and `pipeline` may cross. Their traffic is one gradient reduction per step (data),
FSDP's gathers and reduce-scatters (hierarchical: inside the slice over ICI, across slices over DCN;
MaxText's dcn_fsdp_parallelism) and stage-to-stage sends (MaxText's dcn_pipeline_parallelism).
Tensor, sequence and expert collectives run in every layer on activations and are refused across DCN,
as MaxText's multi-slice guidance keeps them inside a slice.
"""

from __future__ import annotations

from collections.abc import Sequence

from codesign.sharding.strategy import StrategyError

DCN_AXES = ("data", "fsdp", "pipeline")


class SliceError(StrategyError):
    """A layout that cannot be laid over the slices (an axis crosses them that may not, or unevenly)."""


def slice_split(mesh: Sequence[tuple[str, int]], slices: int) -> dict[str, tuple[int, int]]:
    """Per mesh axis (outermost first in `mesh`): (devices of the axis inside one slice, slices it
    spans). The products are the slice size and `slices`. Raises SliceError when the split is uneven or
    an axis other than DCN_AXES would cross slices."""
    n = 1
    for _, size in mesh:
        n *= int(size)
    if slices < 1 or n % slices:
        raise SliceError(
            f"{n} devices do not split into {slices} equal slices; use a slice count dividing {n}"
        )
    per_slice = n // slices
    out: dict[str, tuple[int, int]] = {}
    stride = 1
    for name, size in reversed(list(mesh)):
        lo, hi = stride, stride * int(size)
        if size == 1 or hi <= per_slice:
            out[name] = (int(size), 1)
        elif (lo >= per_slice and lo % per_slice) or (lo < per_slice and (per_slice % lo or hi % per_slice)):
            raise SliceError(
                f"{name}={size} does not split evenly at the slice boundary ({per_slice} devices per "
                f"slice); pick sizes whose inner axes fill whole slices"
            )
        else:
            inner = max(1, per_slice // lo)
            out[name] = (inner, int(size) // inner)
            if name not in DCN_AXES:
                raise SliceError(
                    f"{name}={size} would cross TPU slices ({out[name][1]} slices over DCN); only "
                    f"{', '.join(DCN_AXES)} may ride DCN: make data or fsdp the outermost axes "
                    f"spanning the {slices} slices"
                )
        stride = hi
    return {name: out[name] for name, _ in mesh}


def slice_problem(mesh: Sequence[tuple[str, int]], slices: int) -> str | None:
    """Why this mesh cannot be laid over `slices` TPU slices (None when it can, or slices <= 1)."""
    if slices <= 1:
        return None
    try:
        slice_split(mesh, slices)
    except SliceError as e:
        return str(e)
    return None


def slice_reason_key(reason: str) -> str:
    """A refusal grouped for the planner's counts: the axis, not its size."""
    head = reason.split("=")[0]
    if "would cross TPU slices" in reason:
        return f"{head} would cross TPU slices (only {', '.join(DCN_AXES)} may ride DCN)"
    return f"{head} does not split evenly at the slice boundary"

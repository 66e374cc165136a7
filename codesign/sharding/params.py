"""Param shardings from the logical axes that every NNX param carries in its metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import _compat
from codesign.sharding.rules import Dropped, Rules


def path_str(path) -> str:
    """ "blocks/attn/wq" for a tree path (jax.tree_util.keystr, with "/" between keys)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def logical_axes(abstract_state: nnx.State) -> dict:
    """Pure-dict tree (same structure as nnx.to_pure_dict) of each param's logical axis names."""

    def names(v):
        return tuple(_compat.param_logical_axes(v) or (None,) * len(v.shape))

    tree = jax.tree.map(names, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def resolve_specs(
    shapes: Any, axes_tree: Any, rules: Rules, mesh_sizes: Mapping[str, int], strict: bool
) -> tuple[Any, tuple[Dropped, ...]]:
    """PartitionSpec per leaf of `shapes` (a pure-dict tree of arrays/ShapeDtypeStructs)."""
    dropped: list[Dropped] = []
    flat_axes = dict(
        jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    )

    def one(path, leaf):
        spec, drops = rules.resolve(
            flat_axes[path], leaf.shape, mesh_sizes, path=path_str(path), strict=strict
        )
        dropped.extend(drops)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, shapes)
    return specs, tuple(dropped)


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def zero_dim(
    spec: PartitionSpec,
    shape: tuple[int, ...],
    logical: tuple,
    rules: Rules,
    mesh_sizes: Mapping[str, int],
    axis: str = "data",
) -> int | None:
    """The dimension on which ZeRO shards a param's optimizer state (and gradient) over `axis`.

    First choice: the dimension the rules give to `fsdp` (where FSDP would shard it), then the other
    dimensions, largest first. A dimension qualifies when its size divides by its current mesh axes
    times `axis`. `axis` goes *after* the dimension's current axes (e.g. `(fsdp, data)`), so each
    device's optimizer shard is a slice of its own param shard: the update needs no resharding, only
    the all-gather of the updated params over `axis`. None: no dimension qualifies (stays replicated).
    """
    n = mesh_sizes.get(axis, 1)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    fsdp_dims = [i for i, name in enumerate(logical) if name is not None and "fsdp" in rules.lookup(name)]
    rest = sorted((i for i in range(len(shape)) if i not in fsdp_dims), key=lambda i: -shape[i])
    for i in fsdp_dims + rest:
        have = math.prod(mesh_sizes.get(a, 1) for a in _axes_of(entries[i]))
        if shape[i] % (have * n) == 0:
            return i
    return None


def zero_specs(
    param_specs: Any,
    shapes: Any,
    axes_tree: Any,
    rules: Rules,
    mesh_sizes: Mapping[str, int],
    level: int,
    axis: str = "data",
) -> tuple[Any, tuple[Dropped, ...]]:
    """(specs, dropped) for ZeRO level `level` over `axis` (3: the params themselves, as FSDP shards
    them): each param's spec with `axis` added on its
    `zero_dim`; a param where no dimension divides keeps its spec and is recorded in `dropped`; a param
    already sharded over `axis` keeps its spec."""
    flat_axes = dict(
        jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    )
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    dropped: list[Dropped] = []

    def one(path, spec):
        if axis_dim(spec, axis) is not None:  # the param is sharded over `axis` already (expert weights)
            return spec
        shape = tuple(flat_shapes[path].shape)
        d = zero_dim(spec, shape, flat_axes[path], rules, mesh_sizes, axis)
        if d is None:
            dropped.append(
                Dropped(
                    f"{'params' if level == 3 else 'opt_state'}/{path_str(path)}",
                    f"zero={level}",
                    axis,
                    f"no dimension of {shape} divides by its mesh axes x {axis}="
                    f"{mesh_sizes.get(axis, 1)}: {'it' if level == 3 else 'optimizer state'} stays "
                    f"replicated over {axis}",
                )
            )
            return spec
        entries = list(spec) + [None] * (d + 1 - len(spec))
        new = (*_axes_of(entries[d]), axis)
        entries[d] = new[0] if len(new) == 1 else new
        return PartitionSpec(*entries)

    specs = jax.tree_util.tree_map_with_path(one, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return specs, tuple(dropped)


def axis_dim(spec: PartitionSpec, axis: str) -> int | None:
    """The dimension `spec` shards over mesh axis `axis` (None: not sharded over it)."""
    for i, entry in enumerate(spec):
        if axis in _axes_of(entry):
            return i
    return None


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )

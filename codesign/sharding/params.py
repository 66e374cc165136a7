"""Param shardings from the logical axes that every NNX param carries in its metadata."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import _compat
from codesign.sharding.rules import Dropped, Rules


def path_str(path) -> str:
    """"blocks/attn/wq" for a tree path (jax.tree_util.keystr, with "/" between keys)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def logical_axes(abstract_state: nnx.State) -> dict:
    """Pure-dict tree (same structure as nnx.to_pure_dict) of each param's logical axis names."""
    def names(v):
        return tuple(_compat.param_logical_axes(v) or (None,) * len(v.shape))

    tree = jax.tree.map(names, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def resolve_specs(shapes: Any, axes_tree: Any, rules: Rules, mesh_sizes: Mapping[str, int],
                  strict: bool) -> tuple[Any, tuple[Dropped, ...]]:
    """PartitionSpec per leaf of `shapes` (a pure-dict tree of arrays/ShapeDtypeStructs)."""
    dropped: list[Dropped] = []
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0])

    def one(path, leaf):
        spec, drops = rules.resolve(flat_axes[path], leaf.shape, mesh_sizes, path=path_str(path), strict=strict)
        dropped.extend(drops)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, shapes)
    return specs, tuple(dropped)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

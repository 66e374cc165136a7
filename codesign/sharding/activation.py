"""The one activation-constraint helper models call at block boundaries.

`constrain(x, ("act_batch", "act_seq", "act_embed"))` resolves the logical names through the
active plan's rules and pins the layout with `with_sharding_constraint`. Outside an
`activation_sharding(...)` context it returns `x` unchanged, so models run without any plan.
Activation rules resolve non-strictly: a decode batch of 1 simply stays unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign.sharding.rules import Rules


@dataclass(frozen=True)
class _Active:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("codesign_activation", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVE.set(_Active(mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_spec(
    logical_axes: Sequence[str | None], shape: tuple[int, ...]
) -> tuple[Mesh, PartitionSpec] | None:
    """(mesh, PartitionSpec) the active plan gives an activation of `shape` with these logical axes
    (what `constrain` pins), or None outside an `activation_sharding` context. For code that places
    its own shards (a `shard_map`ped kernel)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    sizes = dict(zip(active.mesh.axis_names, active.mesh.devices.shape))
    spec, _ = active.rules.resolve(logical_axes, shape, sizes, path="activation", strict=False)
    return active.mesh, spec


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    placed = active_spec(logical_axes, x.shape)
    if placed is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(*placed))

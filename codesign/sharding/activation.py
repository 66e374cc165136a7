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

from codesign.axes import ACT_BATCH
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


@contextlib.contextmanager
def batch_also_over(axis: str) -> Iterator[None]:
    """Within: the active rules shard activations' batch over `axis` too (after the batch axes already
    there). The pipelined step runs its LM head this way, so the pipeline devices split the head's
    work instead of each repeating it."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    table = tuple(
        (name, tuple(m for m in axes if m != axis) + (axis,)) if name == ACT_BATCH else (name, axes)
        for name, axes in active.rules.table
    )
    with activation_sharding(active.mesh, Rules(table, active.rules.may_replicate)):
        yield


def pin_dims(x: jax.Array, placed: dict[int, str | None]) -> jax.Array:
    """x with the dimensions in `placed` laid out as given (a mesh axis, or None: not sharded) and its
    other dimensions left to the partitioner. Identity outside an `activation_sharding` context."""
    active = _ACTIVE.get()
    if active is None:
        return x
    spec = PartitionSpec(*(placed.get(d, PartitionSpec.UNCONSTRAINED) for d in range(x.ndim)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


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

"""The one activation-constraint helper models call at block boundaries.

`constrain(x, RESIDUAL)` resolves the logical names through the active plan's rules
(`activation_spec`) and pins the layout with `with_sharding_constraint`. Outside an
`activation_sharding(...)` context it returns `x` unchanged, so models run without any plan.
Activation rules resolve non-strictly: a decode batch of 1 simply stays unsharded.

The named layouts below are the ones the models pin at block boundaries. The closed form resolves the
same names through the same `activation_spec` to know how many ways each activation is split, so a
`rules=FILE` strategy is costed with the layout it is compiled with.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import axes as A
from codesign.sharding.rules import Rules

# The residual stream between blocks; its positions shard over `tensor` too under sequence parallelism.
RESIDUAL = (A.ACT_BATCH, A.ACT_NORM_SEQ, A.ACT_EMBED)
# A norm's output as the next tensor-parallel block reads it: every position of the tensor group's
# sequence (the same layout as RESIDUAL without sp). Under sp, pinning it makes XLA all-gather the
# normed activations (Megatron's g) rather than all-gather the block's weights and keep the
# activations sequence-sharded, which it prefers when a shard of tokens is smaller than the weights.
GATHERED = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_EMBED)
HEADS = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_HEADS, None)  # q, k, v and the attention context [b, s, n, h]
FFN = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_MLP)  # the FFN's intermediate activation [b, s, f]
LOGITS = (A.ACT_BATCH, A.ACT_SEQ, A.ACT_VOCAB)


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


def activation_spec(
    rules: Rules, logical_axes: Sequence[str | None], shape: Sequence[int], mesh_sizes: Mapping[str, int]
) -> PartitionSpec:
    """The layout of one activation of this global shape: the one rule resolution the program's
    constraints and the closed form share (non-strict: an axis that does not divide is dropped)."""
    spec, _ = rules.resolve(logical_axes, shape, mesh_sizes, path="activation", strict=False)
    return spec


def mesh_axes_of(spec: PartitionSpec) -> tuple[tuple[str, ...], ...]:
    """The mesh axes sharding each dimension of `spec` (an empty tuple: replicated)."""
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec)


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
        (name, tuple(m for m in axes if m != axis) + (axis,)) if name == A.ACT_BATCH else (name, axes)
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
    return active.mesh, activation_spec(active.rules, logical_axes, shape, sizes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    placed = active_spec(logical_axes, x.shape)
    if placed is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(*placed))

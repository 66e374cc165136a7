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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    sizes = dict(zip(active.mesh.axis_names, active.mesh.devices.shape))
    spec = activation_spec(active.rules, logical_axes, x.shape, sizes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))

"""A checkpointed state's integrity record: a digest of every leaf and which float leaves hold NaN or
Infinity, computed on the devices where the leaves live (`inspect_state`), and the SHA-256 of the saved
metadata (`extra_sha256`). `codesign.train.checkpoint` writes the record with each step and checks it
on restore."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DIGEST_ALGORITHM = "fmix32x2/v1"


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """'a/b/0'-style path -> leaf; the same string for a dict, list, tuple or nnx.State container,
    because Orbax's metadata tree comes back as plain dicts and lists whatever was saved."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


# -- digests and finiteness, computed on the devices -------------------------------------------------
def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: a bijection in which every input bit flips about half the output."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; two per element of an 8-byte dtype)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[np.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element (mod 2^32), built from per-axis iotas so that each shard
    computes its own part."""
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return pos


def _digest(x: jax.Array, rows: int | None = None) -> jax.Array:
    """uint32[2]: sums over elements of fmix(word ^ fmix(position + seed)). Sums mod 2^32 do not depend
    on the reduction order, so the digest is the same under any sharding; keying by position catches
    swapped elements; two seeds leave a 2^-64 chance that a corruption goes unnoticed. With `rows`,
    over the first rows of axis 0 only (row-major positions: those of the leaf cut to them), masked
    rather than sliced so that no shard moves."""
    w = _words(x)
    pos = _positions(w.shape)
    keep = None if rows is None else jax.lax.broadcasted_iota(jnp.int32, w.shape, 0) < rows

    def total(h):
        return jnp.sum(h if keep is None else jnp.where(keep, h, np.uint32(0)), dtype=jnp.uint32)

    return jnp.stack([total(_fmix(w ^ _fmix(pos + np.uint32(seed)))) for seed in (0x9E3779B9, 0x7F4A7C15)])


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.ones((), jnp.bool_)


def _inspect_impl(leaves: list[jax.Array], rows: tuple[int | None, ...]) -> tuple[jax.Array, jax.Array]:
    digests = (
        jnp.stack([_digest(x, n) for x, n in zip(leaves, rows)]) if leaves else jnp.zeros((0, 2), jnp.uint32)
    )
    finite = jnp.stack([_finite(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.bool_)
    return digests, finite


@functools.lru_cache(maxsize=8)
def _inspect_fn(out_sharding: NamedSharding | None):
    return jax.jit(_inspect_impl, out_shardings=out_sharding, static_argnums=1)


def _host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value, also when it spans several processes."""
    return np.asarray(x.addressable_shards[0].data)


def inspect_state(tree: Any, rows: Mapping[str, int] | None = None) -> tuple[dict[str, str], list[str]]:
    """({leaf path: 16-hex-digit digest}, [paths of float leaves holding NaN or Infinity]); a leaf in
    `rows` is digested over its first rows only (the rest is a layout's zero padding)."""
    by_path = leaves_by_path(tree)
    leaves = list(by_path.values())
    mesh = next(
        (x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None
    )
    out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    rows = rows or {}
    digests, finite = _inspect_fn(out)(leaves, tuple(rows.get(p) for p in by_path))
    digests, finite = _host_value(digests), _host_value(finite)
    paths = list(by_path)
    return (
        {p: f"{int(d[0]):08x}{int(d[1]):08x}" for p, d in zip(paths, digests)},
        [p for p, ok in zip(paths, finite) if not ok],
    )


def extra_sha256(extra: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(extra, sort_keys=True, allow_nan=False).encode()).hexdigest()

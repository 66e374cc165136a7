"""Dropout whose masks do not depend on the layout.

GPT-style recipes (Megatron-LM's GPT, GPT-3) drop the attention probabilities and the hidden states
entering the residual stream (`ModelConfig.attention_dropout`, `hidden_dropout`). For the same loss
under every layout, each mask element is a function of (step key, layer, site, global batch row,
position within the row) only: the train step names each row it feeds in (`rows`: the row's index in
the global batch, which survives the microbatch split, the replica vmap and the pipeline's circular
buffer), and the bits come from `jax.random` keyed per row. With `jax_threefry_partitionable` (on by
default) the bits of a sharded shape are computed where they live, so no layout moves them.

The train step opens a `scope(key, rows)` around the forward; `models.transformer.run_layers` hands
each layer its own key (`layer_key`) and the rows as explicit arguments, so a recomputed layer
(jax.checkpoint, or the custom VJP of remat=full_layer) draws the same masks again. Outside a scope
(inference, an abstract model) dropout is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Sites within a layer (folded into the layer's key), and the embedding's own.
ATTENTION_PROBS, ATTENTION_OUT, FFN_OUT, EMBEDDING = 0, 1, 2, 3


class Draw(NamedTuple):
    key: jax.Array  # uint32[2] (raw PRNG key data), per step, then per layer
    rows: jax.Array  # int32[b]: the global batch row of each row of the activations


_CURRENT: contextvars.ContextVar[Draw | None] = contextvars.ContextVar("codesign_dropout", default=None)


def step_key(step) -> jax.Array:
    """The step's dropout key: fixed base, folded with the optimizer step (resumes draw the same)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), step)


@contextlib.contextmanager
def scope(draw: Draw | None):
    token = _CURRENT.set(draw)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Draw | None:
    return _CURRENT.get()


def layer_key(draw: Draw | None, layer) -> Draw | None:
    """The draw of one layer of the stack (`layer`: its global index, traced or not)."""
    return None if draw is None else Draw(jax.random.fold_in(draw.key, layer), draw.rows)


def split_rows(draw: Draw | None, rows: jax.Array) -> Draw | None:
    return None if draw is None else Draw(draw.key, rows)


def dropout(x: jax.Array, rate: float, site: int) -> jax.Array:
    """Zero each element of x [b, ...] with probability `rate` and scale the rest by 1 / (1 - rate)."""
    draw = current()
    if rate <= 0.0 or draw is None:
        return x
    if draw.rows.shape[0] != x.shape[0]:
        raise ValueError(f"dropout over {x.shape[0]} rows, but the scope names {draw.rows.shape[0]}")
    key = jax.random.fold_in(draw.key, site)
    keep = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(key, r), 1.0 - rate, x.shape[1:]))(
        draw.rows
    )
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

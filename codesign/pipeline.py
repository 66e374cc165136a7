"""The pipelined layer stack: a circular, vmapped-stage pipeline over the `pipeline` mesh axis.

The stack of L scanned blocks is cut into `stages x repeats` chunks of `ceil(L / (p V))` layers
(p = pipeline, V = stages_per_device). Chunk c holds layers [c Lc, (c+1) Lc); stage s (pipeline device
s) holds chunks s, s + p, s + 2p, ... (Megatron's interleaved assignment). An uneven split is padded at
the end with identity layers (zero params, masked out: no output change, no aux loss, zero gradient), so
the last chunks carry fewer real layers.

The program is one `lax.scan` over ticks. Every tick, each stage runs one chunk on one microbatch:
stage s at tick t works on k = t - s (microbatch k mod M, repeat k // M), valid when 0 <= k < M V. The
stages are a `vmap` over the stage axis of the activations `[p, mb, S, D]` and of the params
`[V, p, Lc, ...]`, with `spmd_axis_name="pipeline"`, so that every sharding constraint in the blocks
gains `pipeline` on the stage axis and each device computes only its own stage. After the tick the
outputs rotate one stage forward (`rotate`: one collective-permute forward, one backward); what the last
stage produced arrives at stage 0, which files it in its microbatch buffer, to be read again at tick
k + M (the next repeat) or to leave the pipeline (the last repeat). This needs M >= p when V > 1 (a
microbatch is back at stage 0 before it is needed); the buffer is `[p, M, mb, S, D]` sharded over
`pipeline`, and only stage 0's slice is read, so no tick moves data except the rotation. Ticks:
M V + p - 1, of which p - 1 are fill and drain (each stage computes a masked chunk on p - 1 of them):
the interleaved bubble (p - 1) / (M V) in chunk units.

Why this formulation and not `ppermute` inside a `shard_map` over `pipeline` (MaxText has both): it is
plain SPMD, so fsdp, tensor, sequence, expert, ZeRO and remat compose through the partitioner exactly
as in the unpipelined step, and autodiff and the loop-aware HLO walk see one ordinary while loop. A
partially manual shard_map would put every gather of the blocks inside a manual region, which aborts
XLA's partitioner on this jax/libtpu (see `codesign.train_step`).

What the compiled program executes, precisely: JAX differentiates the whole tick loop, so the program
runs all M V + p - 1 forward ticks, then all backward ticks in reverse (GPipe order). Between them each
stage keeps what the remat policy saves of one chunk for every tick, masked ticks included: (M V + p - 1)
chunk-passes, i.e. M + (p - 1) / V microbatches' worth of the stage's activations. 1F1B and interleaved
1F1B reorder backward passes between forward passes to bound that to about p microbatches; the ordering
is not expressible as the autodiff of one forward loop, so they are `codesign.pipeline_1f1b`, which
writes the backward itself. This program is what schedule=gpipe runs, and dualpipe (whose two
directions are not built); the forward alone is also the 1F1B loss's value when no gradient is taken.

Outside the loop: the embedding and the layers outside the pipelined stack (a DeepSeek-style dense
prefix, as MaxText does) run replicated over `pipeline`; the final norm, LM head and loss run with the
batch split over `pipeline` too (`batch_also_over`), so no stage repeats the head's work.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codesign.arithmetic import pipeline_ticks
from codesign.models import dropout as D
from codesign.models.transformer import RESIDUAL, run_layers
from codesign.sharding.activation import constrain, pin_dims

AXIS = "pipeline"


def chunk_layers(n_layers: int, stages: int, repeats: int) -> int:
    """Layers per stage chunk (the last chunks are padded when the split is uneven)."""
    return -(-n_layers // (stages * repeats))


def stored_layers(n_layers: int, stages: int) -> int:
    """Rows a pipelined stack of n layers is stored with: zero-padded at the end to a multiple of the
    stages, so that its `layers` axis shards over `pipeline` (JAX shards no uneven dimension)."""
    return -(-n_layers // stages) * stages


def to_stage_layout(tree: Any, n_layers: int, stages: int, repeats: int) -> Any:
    """Stacked-layer leaves [R, ...] (R >= n_layers rows, those past n_layers zero padding) ->
    [V, p, Lc, ...] (zero-padded to V p Lc layers): chunk r p + s is stage s's r-th chunk."""
    lc = chunk_layers(n_layers, stages, repeats)

    def one(a):
        pad = stages * repeats * lc - a.shape[0]
        if pad:
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(repeats, stages, lc, *a.shape[1:])

    return jax.tree.map(one, tree)


def layer_mask(n_layers: int, stages: int, repeats: int) -> np.ndarray:
    """bool [V, p, Lc]: True for real layers, False for the padding of an uneven split."""
    lc = chunk_layers(n_layers, stages, repeats)
    return (np.arange(stages * repeats * lc) < n_layers).reshape(repeats, stages, lc)


@jax.custom_vjp
def rotate(x):
    """Stage s's slice moves to stage s + 1, the last wraps to stage 0: one collective-permute over the
    pipeline-sharded axis 0. Its gradient is the rotation back, also one permute (the autodiff of
    `jnp.roll` splits it into two partial permutes, which the HLO walk would count as two transfers)."""
    return jnp.roll(x, 1, axis=0)


rotate.defvjp(lambda x: (rotate(x), None), lambda _, g: (jnp.roll(g, -1, axis=0),))


def per_stage(fn, **vmap_kw):
    """vmap over the stage axis, which the sharding constraints inside put on `pipeline`."""
    return jax.vmap(fn, spmd_axis_name=AXIS, **vmap_kw)


def pin_stages(tree: Any) -> Any:
    """Stage-layout leaves [V, p, Lc, ...] with the stage axis on `pipeline` (the chunk and layer axes
    unsharded), so each device's chunks are local to it."""
    return jax.tree.map(lambda a: pin_dims(a, {0: None, 1: AXIS, 2: None}), tree)


def run_pipeline(
    graphdef,
    layers,
    xs,
    positions,
    *,
    stages: int,
    repeats: int,
    remat: str,
    first_layer=0,
    rows=None,
    n_layers: int | None = None,
):
    """Run the stacked blocks `layers` (leaves [R, ...]: the first n_layers real, default all R, the
    rest zero padding) over microbatches xs [M, mb, S, D].

    Dropout (`models.dropout`, when a scope is open): `rows` [M, mb] are the global batch rows of each
    microbatch, and the stack's layer l draws as model layer first_layer + l, as it would unpipelined.
    Returns (ys [M, mb, S, D], aux summed over the layers and averaged over the microbatches).
    """
    p, v, m = stages, repeats, xs.shape[0]
    if v > 1 and m < p:
        raise ValueError(f"an interleaved pipeline needs microbatches >= stages, got {m} < {p}")
    stored = jax.tree.leaves(layers)[0].shape[0]
    n_layers = stored if n_layers is None else n_layers
    # [V, p, Lc, ...] with the stage axis on `pipeline` before the loop: the per-tick chunk pick is then
    # local (left to the partitioner, the V > 1 reorder was redone inside the loop, every tick).
    params = pin_stages(to_stage_layout(layers, n_layers, p, v))
    mask = jnp.asarray(layer_mask(n_layers, p, v))
    ids = to_stage_layout(first_layer + jnp.arange(stored), n_layers, p, v)
    draw = D.current()
    if draw is not None and rows is None:
        raise ValueError("run_pipeline under a dropout scope needs the microbatches' global rows (rows=)")
    stage_ids = jnp.arange(p)
    residual = per_stage(lambda y: constrain(y, RESIDUAL))
    buffer = per_stage(jax.vmap(lambda y: constrain(y, RESIDUAL)))

    def tick(carry, t):
        state, buf, aux = carry
        k = t - stage_ids
        live = (k >= 0) & (k < m * v)
        rep = jnp.clip(k // m, 0, v - 1)

        def stage(s, x_prev, buf_s, r, ok, chunk_params, chunk_mask, chunk_ids):
            x_in = jnp.where(s == 0, buf_s[t % m], x_prev)
            chunk = jax.tree.map(lambda a: a[r], chunk_params)
            # The microbatch this stage works on at tick t: t - s, modulo m.
            stage_draw = None if draw is None else D.Draw(draw.key, rows[jnp.mod(t - s, m)])
            with D.scope(stage_draw):
                y, a = run_layers(
                    graphdef, chunk, x_in, positions, remat, chunk_mask[r], layer_ids=chunk_ids[r]
                )
            return y, jnp.where(ok, a, 0.0)

        ys, a = per_stage(stage, in_axes=(0, 0, 0, 0, 0, 1, 1, 1))(
            stage_ids, state, buf, rep, live, params, mask, ids
        )
        # Stage s's output moves to stage s + 1; the last stage's wraps around to stage 0.
        ys = residual(rotate(ys))
        done = t - (p - 1)  # the microbatch step the last stage just finished
        slot = jnp.mod(done, m)

        def file(s, buf_s, y):
            keep = (s == 0) & (done >= 0) & (done < m * v)
            return buf_s.at[slot].set(jnp.where(keep, y, buf_s[slot]))

        buf = buffer(per_stage(file)(stage_ids, buf, ys))
        return (ys, buf, aux + a.sum()), None

    state = residual(jnp.zeros((p,) + xs.shape[1:], xs.dtype))
    buf = buffer(jnp.broadcast_to(xs, (p,) + xs.shape))  # each device's copy is local: no transfer
    (state, buf, aux), _ = jax.lax.scan(
        tick, (state, buf, jnp.zeros((), jnp.float32)), jnp.arange(pipeline_ticks(m, p, v))
    )
    return buf[0], aux / m

"""The 1F1B-ordered pipelined stack: forward and backward chunks interleaved in one loop.

`codesign.pipeline` runs the stages as one forward loop and lets JAX differentiate it, so every
forward tick runs before any backward tick (GPipe order) and each stage keeps the saved activations of
all M V chunk-passes. 1F1B and interleaved 1F1B bound that to about p microbatches by running a
microbatch's backward soon after its forward, an ordering autodiff of a forward loop cannot produce.
So this module writes the backward itself: each tick, every stage runs one forward chunk and one
backward chunk (`jax.vjp` of the chunk), and the residuals of a forward wait in a ring of K slots
until the chunk's backward reads them.

Layout and schedule, in ticks (stage s = pipeline device s; the same stage layout as
`codesign.pipeline`: chunk r p + s is stage s's r-th chunk, uneven splits padded with identity layers):
- Forward unit k (k = 0 .. M V - 1) enters stage s at tick k + s. Units go in groups of p microbatches
  through the V chunks (Megatron's interleaved order): k = g p V + r p + j is microbatch g p + j,
  chunk r. A microbatch leaving stage p - 1 reaches stage 0 for its next chunk on the next tick, so
  no microbatch waits in a buffer. Needs M % p == 0 when V > 1 (as Megatron asserts).
- The last stage's output of the last chunk goes through the LM head and the loss in the same tick,
  and its backward starts there: backward unit k (chunks in reverse order) is at stage s at tick
  k + p V - 1 + (p - 1 - s). Gradients flow one stage back per tick.
- Ticks: M V + p V + p - 2, in three loops (`arithmetic.pipeline_loops`): p V - 1 forward-only
  (warm-up), M V + p - p V forward and backward, p V - 1 backward-only (drain). Time = (M V + p - 1)
  x (F + B) of one chunk: the interleaved-1F1B bubble (p - 1)/(M V), as `closed_form.pipeline`
  charges it.
- In flight: stage s holds a forward's residuals for 2 (p V - 1 - r p - s) + 1 ticks, so the ring has
  K = min(2 p V - 1, M V) slots (`arithmetic.ring_slots`); the first stage is the busiest. That is
  (2 p V - 1)/V microbatches' worth of the device's layers, about 2x Megatron's p (1 + (p - 1)/(p V)):
  in a synchronous tick the first stage's warm-up forwards are no faster than its steady ones, so it
  runs p - 1 more forwards before its first backward arrives.

Residuals. The chunk's params are loop-invariant, so the ring must not keep copies of them. The VJP's
residual leaves that are the chunk's own (compute-dtype) params or the positions are recognised by
identity and re-supplied at backward time; only the rest is stored. The params enter the VJP already
cast to the blocks' compute dtype (norm scales stay f32, as the blocks read them), so a matmul's saved
weight is the input itself, not a cast made inside. What remains per slot is what the remat policy
saves for the chunk, its input and dropout bits.

Why a vmapped-stage loop (as `codesign.pipeline`), not `ppermute` in a `shard_map`: the same reasons,
the partitioner composes fsdp, tensor, expert and ZeRO with it unchanged. The cost: per tick each
device runs its forward and its backward chunk even when its unit is idle (masked), exactly the
bubble, and the LM head runs on every device (the head's batch split over `pipeline` where it divides).

The first stage's input (`Source`): a dense model's embedding lookup runs in the loop, per microbatch,
and its gradient is scatter-added into an embedding-shaped accumulator, so nothing of size M is held.
An MoE model's dense prefix runs before the loop for all microbatches (as in `codesign.pipeline`): its
output [M, mb, S, D] is the source table, and the prefix's backward runs after the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from codesign.arithmetic import pipeline_loops, ring_slots
from codesign.models import dropout as D
from codesign.models.transformer import RESIDUAL, run_layers
from codesign.pipeline import AXIS, chunk_layers, layer_mask, per_stage, pin_stages, to_stage_layout
from codesign.sharding.activation import constrain, pin_dims


def schedule_problem(microbatches: int, stages: int, repeats: int) -> str | None:
    if repeats > 1 and microbatches % stages:
        return (
            f"interleaved 1F1B runs microbatches in groups of pipeline={stages}; microbatches={microbatches} "
            f"does not divide (use a multiple of {stages}, or schedule=gpipe)"
        )
    return None


def _unit(k, m: int, p: int, v: int, backward: bool):
    """Unit k of the forward (or backward) order -> (microbatch, chunk, valid); k may be an array."""
    g, w = k // (p * v), k % (p * v)
    r = w // p
    if backward:
        r = v - 1 - r
    mb = g * p + w % p
    ok = (k >= 0) & (k < m * v)
    return jnp.clip(mb, 0, m - 1), jnp.clip(r, 0, v - 1), ok


def _slot(mb, r, p: int, v: int, k_slots: int):
    """The ring slot of (microbatch, chunk)'s forward residuals: its forward unit index mod K."""
    return ((mb // p) * p * v + r * p + mb % p) % k_slots


@dataclass(frozen=True)
class Source:
    """Where the first stage's input for a microbatch comes from: rows of `table` picked by
    `index(mb)`, then `enter(rows)` (differentiable, elementwise). The gradient is scatter-added into a
    table-shaped accumulator as each microbatch's backward leaves the first stage, so no per-microbatch
    buffer is held: for a dense model, `table` is the embedding and `index` the microbatch's tokens
    (the lookup runs per tick, as Megatron's first stage does); when layers run before the pipeline (an
    MoE model's dense prefix), `table` is their output for all microbatches [M, mb, S, D] and `index`
    the microbatch number."""

    table: jax.Array
    index: Callable[[jax.Array], jax.Array]
    enter: Callable[[jax.Array], jax.Array]


def compute_params(chunk: Any, dtype) -> Any:
    """The chunk's params as the blocks read them: matrices in the compute dtype, norm scales f32."""

    def one(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale" or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, chunk)


class _Residuals:
    """Splits a VJP into what must be stored (per forward) and what is re-supplied (`consts`)."""

    def __init__(self):
        self.layout = None  # (treedef, [(is_const, index)]) -- static, the same for every unit

    def split(self, vjp, consts) -> list:
        leaves, tdef = jax.tree.flatten(vjp)
        if not all(isinstance(leaf, jax.Array) for leaf in leaves):
            # jax >= 0.10 returns a pytree `VJP` whose leaves are its residuals; older ones do not.
            raise NotImplementedError("1F1B needs jax.vjp's result to be a pytree of arrays (jax >= 0.10)")
        by_id = {id(c): i for i, c in enumerate(consts)}
        stored, seen, plan = [], {}, []
        for leaf in leaves:
            if id(leaf) in by_id:
                plan.append((True, by_id[id(leaf)]))
                continue
            if id(leaf) not in seen:
                seen[id(leaf)] = len(stored)
                stored.append(leaf)
            plan.append((False, seen[id(leaf)]))
        self.layout = (tdef, plan)
        return stored

    def join(self, stored, consts):
        tdef, plan = self.layout
        return jax.tree.unflatten(tdef, [consts[i] if is_const else stored[i] for is_const, i in plan])


def run_1f1b(
    graphdef,
    layers,
    source: Source,
    microbatches: int,
    positions,
    head_loss: Callable,
    head_params,
    targets,
    *,
    stages: int,
    repeats: int,
    remat: str,
    compute_dtype,
    aux_weight: float,
    first_layer: int = 0,
    rows=None,
    n_layers: int | None = None,
    grad_dtype=None,
):
    """Loss and gradients of the pipelined stack and the head, in 1F1B order.

    layers: stacked block params [R, ...] (the first n_layers real, default all R, the rest zero
    padding); grad_dtype: what the stack's and the head's gradients accumulate in over the
    microbatches (default the params' dtype); source: the first stage's input per microbatch (`Source`);
    positions [mb, S]; head_loss(head_params, y [mb, S, D], targets [mb, S]) -> the microbatch's mean
    loss; targets [M, mb, S]; rows [M, mb]: each microbatch's global batch rows (dropout, when a scope
    is open; the source's `enter` and the blocks draw under it). The step's loss is
    mean_i head_loss_i + aux_weight x (sum of the stack's aux)/M.
    Returns (ce, aux, d_layers [R, ...], d_head_params, d_table: the source table's gradient).
    """
    p, v, m = stages, repeats, microbatches
    problem = schedule_problem(m, p, v)
    if problem:
        raise ValueError(problem)
    stored = jax.tree.leaves(layers)[0].shape[0]
    n_layers = stored if n_layers is None else n_layers
    lc = chunk_layers(n_layers, p, v)
    k_slots = ring_slots(m, p, v)
    off = p * v - 1  # the first backward: the last stage, the tick the first microbatch leaves it
    draw = D.current()
    if draw is not None and rows is None:
        raise ValueError("run_1f1b under a dropout scope needs the microbatches' global rows (rows=)")

    params = pin_stages(to_stage_layout(layers, n_layers, p, v))
    mask = jnp.asarray(layer_mask(n_layers, p, v))
    ids = to_stage_layout(first_layer + jnp.arange(stored), n_layers, p, v)
    stage_ids = jnp.arange(p)
    residual = per_stage(lambda y: constrain(y, RESIDUAL))
    res = _Residuals()

    def chunk_vjp(chunk, x, r, mask_v, ids_v, mb):
        """(y, aux), stored residuals of one chunk's forward."""
        consts = [*jax.tree.leaves(chunk), positions]

        def f(c, h):
            with scope_of(mb):
                return run_layers(graphdef, c, h, positions, remat, mask_v[r], layer_ids=ids_v[r])

        out, vjp = jax.vjp(f, chunk, x)
        return out, res.split(vjp, consts)

    def pick(params_v, r):
        return compute_params(jax.tree.map(lambda a: a[r], params_v), compute_dtype)

    def scope_of(mb):
        return D.scope(None if draw is None else D.Draw(draw.key, rows[mb]))

    def enter(rows_in, mb):
        with scope_of(mb):
            return source.enter(rows_in)

    def forward(s, x_prev, mb, r, ok, params_v, mask_v, ids_v):
        # Every stage looks its microbatch up (cheap, local); only the first stage's first chunk uses it.
        x = jnp.where((s == 0) & (r == 0), enter(source.table[source.index(mb)], mb), x_prev)
        (y, a), stored = chunk_vjp(pick(params_v, r), x, r, mask_v, ids_v, mb)
        return y, jnp.where(ok, a, 0.0), stored

    z = jnp.zeros((), jnp.int32)
    x_spec = jax.eval_shape(lambda: enter(source.table[source.index(z)], z))  # one microbatch's input
    x_zero = jnp.zeros(x_spec.shape, x_spec.dtype)

    def forward_all(x_prev, mb, r, ok):
        """Every stage's forward chunk: (ys [p, ...], aux [p], stored residuals [p, ...] each)."""
        return per_stage(forward, in_axes=(0, 0, 0, 0, 0, 1, 1, 1))(
            stage_ids, x_prev, mb, r, ok, params, mask, ids
        )

    # Shapes of one tick's stored residuals: an abstract trace of the same call the loop makes (traced
    # unit indices, so lookups trace as they will in the loop and the residuals match one for one).
    per_stage_int = jax.ShapeDtypeStruct((p,), jnp.int32)
    shapes = jax.eval_shape(
        forward_all,
        jax.ShapeDtypeStruct((p, *x_spec.shape), x_spec.dtype),
        per_stage_int,
        per_stage_int,
        jax.ShapeDtypeStruct((p,), jnp.bool_),
    )[2]
    ring = [jnp.zeros((p, k_slots, *s.shape[1:]), s.dtype) for s in shapes]
    ring = [pin_dims(a, {0: AXIS}) for a in ring]

    def backward(s, ct_prev, dy_head, mb, r, ok, stored_s, params_v, mask_v, ids_v, grads_v, table_acc):
        ct = jnp.where((s == p - 1) & (r == v - 1), dy_head, ct_prev)
        chunk = pick(params_v, r)
        slot = _slot(mb, r, p, v, k_slots)
        vjp = res.join([a[slot] for a in stored_s], [*jax.tree.leaves(chunk), positions])
        zero = jnp.zeros((), jnp.float32)
        d_chunk, dx = vjp((jnp.where(ok, ct, 0.0).astype(ct.dtype), jnp.where(ok, aux_weight / m, zero)))
        grads_v = jax.tree.map(
            lambda acc, g: acc.at[r].add(jnp.where(ok, g, 0.0).astype(acc.dtype)), grads_v, d_chunk
        )
        dx = jnp.where(ok, dx, 0.0).astype(dx.dtype)
        # The microbatch left the first stage: its input gradient goes into the source table.
        idx = source.index(mb)
        picked = source.table[idx]
        _, enter_vjp = jax.vjp(lambda rows_in: enter(rows_in, mb), picked)
        (d_rows,) = enter_vjp(dx)
        first = (s == 0) & (r == 0) & ok
        table_acc = table_acc.at[idx].add(jnp.where(first, d_rows, 0.0).astype(table_acc.dtype))
        return dx, grads_v, table_acc

    d_head0 = jax.tree.map(lambda a: jnp.zeros(a.shape, grad_dtype or a.dtype), head_params)

    def head(y_last, mb, live):
        """The loss of the microbatch leaving the last stage, and its gradients (zero when none does)."""
        ce, vjp = jax.vjp(lambda hp, y: head_loss(hp, y, targets[mb]), head_params, y_last)
        d_hp, dy = vjp(jnp.asarray(1.0 / m, ce.dtype))
        return jnp.where(live, ce / m, 0.0), jax.tree.map(lambda g: jnp.where(live, g, 0.0), d_hp), dy

    def tick(carry, t, do_f: bool, do_b: bool, do_head: bool):
        fwd_in, bwd_in, ring, grads, d_table, d_head, ce, aux = carry
        dy_head = x_zero
        if do_f:
            mb, r, ok = _unit(t - stage_ids, m, p, v, backward=False)
            ys, a, stored = forward_all(fwd_in, mb, r, ok)
            slot = _slot(mb, r, p, v, k_slots)
            ring = [per_stage(lambda buf, i, x: buf.at[i].set(x))(b, slot, x) for b, x in zip(ring, stored)]
            aux = aux + a.sum()
            if do_head:  # the last stage's output leaves the last chunk: the head and its backward
                k_last = t - (p - 1)
                mb_last, r_last, ok_last = _unit(k_last, m, p, v, backward=False)
                c, d_hp, dy_head = head(ys[p - 1], mb_last, ok_last & (r_last == v - 1))
                ce = ce + c
                d_head = jax.tree.map(jnp.add, d_head, d_hp)
            fwd_in = residual(jnp.roll(ys, 1, axis=0))
        if do_b:
            mb, r, ok = _unit(t - off - (p - 1 - stage_ids), m, p, v, backward=True)
            dx, grads, d_table = per_stage(
                backward, in_axes=(0, 0, None, 0, 0, 0, 0, 1, 1, 1, 1, 0), out_axes=(0, 1, 0)
            )(stage_ids, bwd_in, dy_head, mb, r, ok, ring, params, mask, ids, grads, d_table)
            bwd_in = residual(jnp.roll(dx, -1, axis=0))
        return (fwd_in, bwd_in, ring, grads, d_table, d_head, ce, aux), None

    act = residual(jnp.zeros((p,) + x_spec.shape, x_spec.dtype))
    grads = pin_stages(jax.tree.map(lambda a: jnp.zeros(a.shape, grad_dtype or a.dtype), params))
    # One accumulator per stage (only the first stage's is written): no transfer inside the loop.
    d_table = pin_dims(jnp.zeros((p,) + source.table.shape, source.table.dtype), {0: AXIS})
    zero = jnp.zeros((), jnp.float32)
    carry = (act, act, ring, grads, d_table, d_head0, zero, zero)

    def ticks(carry, first: int, n: int, do_f: bool, do_b: bool, do_head: bool = False):
        if n <= 0:
            return carry
        body = lambda c, t: tick(c, t, do_f, do_b, do_head)
        return jax.lax.scan(body, carry, first + jnp.arange(n))[0]

    warm, steady, _ = pipeline_loops(m, p, v)
    carry = ticks(carry, 0, warm, True, False)
    if v == 1:  # every steady tick ends a microbatch on the last stage
        carry = ticks(carry, warm, steady, True, True, True)
    else:
        # The last stage runs a microbatch's last chunk on p ticks of every p V (its units go in groups
        # of p through the V chunks): loops with and without the head, so that neither the program nor
        # the HLO walk runs the head on the other ticks.
        def group(c, g):
            first = warm + g * p * v
            c = ticks(c, first, p, True, True, True)
            return ticks(c, first + p, (v - 1) * p, True, True), None

        groups = m // p - 1
        if groups > 0:
            carry = jax.lax.scan(group, carry, jnp.arange(groups))[0]
        carry = ticks(carry, warm + groups * p * v, p, True, True, True)
    carry = ticks(carry, warm + steady, pipeline_loops(m, p, v)[2], False, True)
    _, _, _, grads, d_table, d_head, ce, aux = carry
    d_layers = jax.tree.map(lambda g: g.reshape(p * v * lc, *g.shape[3:])[:stored], grads)
    return ce, aux / m, d_layers, d_head, d_table[0]

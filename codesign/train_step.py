"""The train step shared by the planner (lowered from abstract inputs) and the trainer (executed).

`TrainProgram` is the step on a `codesign.state_layout.StateLayout` (where each param, gradient and
optimizer leaf lives, and the abstract inputs): it jits the step with the layout's pinned in/out
shardings so that FSDP gradients reduce-scatter instead of all-reducing. Loss: next-token
cross-entropy + MoE aux loss; AdamW with f32 master params, bf16 compute, global-norm clipping,
warmup+cosine schedule and gradient accumulation.

One gradient reduction per step over the data replicas (DESIGN.md "Fidelity"). XLA's SPMD lowering
of a scanned accumulation reduces across replicas inside the loop, once per microbatch, and its loop
code-motion passes do not move it out. So the program writes the reduction itself rather than rely
on a pass. Over the pure replica axes (`replica_axes`: batch axes that shard no param, normally
`data`), each microbatch's backward runs under `vmap(spmd_axis_name=...)` over an explicit replica
axis: it yields each replica's *unreduced* gradient, `[R, ...]` sharded over those axes, and nothing
in the loop sums over them. The accumulator keeps that form; after the loop one full-manual
`shard_map` does the only reduction: `psum` (zero=0) or `psum_scatter` over `data` (zero>=1), in
the accumulator's dtype (the f32 master params'). Without accumulation and ZeRO there is one
reduction anyway, and the step leaves it to the partitioner as before.
fsdp, tensor, expert and sequence stay with the auto partitioner: FSDP (ZeRO-3) still gathers params
and reduces their gradients over fsdp per microbatch, as it must to keep gradients sharded, and so
do expert and sequence for the params they do not shard.

Why vmap, not a partially manual `shard_map` around the backward: with jax 0.10.2 and libtpu 0.0.52,
XLA's partitioner aborts the process ("Check failed: partition_group_list...") on gathers and
scatters with sharded operands inside a partially manual region (the embedding lookup, the label
pick of the cross-entropy, with fsdp and tensor > 1), and a `psum_scatter` there first replicates
its operand over the auto axes.

ZeRO (`zero=` in the strategy) over `data`: 1 = AdamW moments sharded over `data` (added after the
param's own axes on the dimension FSDP shards, see `params.zero_dim`), gradients reduce-scattered
once per step, each replica updates its slice of the params, and the updated params are all-gathered
over `data` (the pinned out_shardings); 2 = also the gradient accumulator is sharded, so each
microbatch's gradient is reduce-scattered as it is produced (as DeepSpeed's stage 2 does under
accumulation): less memory, M reduce-scatters per step instead of one.

Pipeline (pipeline=p > 1): the stacked blocks (an MoE model's MoE stack; its dense prefix runs before)
run over the `pipeline` axis, in 1F1B order for schedule=1f1b|interleaved (`codesign.pipeline_1f1b`,
whose loop computes loss and gradients together: the loss is a custom VJP around it) and as the autodiff
of a circular forward loop for gpipe|dualpipe (`codesign.pipeline`). `microbatches` are the pipeline's:
all of them flow through the stages in one pass and the gradient sums over them, so there is no
accumulation loop around it (Megatron's num_microbatches). The state keeps the logical param tree
(the stack's `layers` axis sharded over `pipeline`), so checkpoints move freely between pipelined and
unpipelined layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import cached_property

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import _compat
from codesign.config import Workload, dtype_name
from codesign.models import dropout as D
from codesign.models.transformer import Transformer, enter_residual, run_layers
from codesign.pipeline import run_pipeline
from codesign.pipeline_1f1b import Source, run_1f1b, schedule_problem
from codesign.sharding.activation import activation_sharding, batch_also_over
from codesign.sharding.params import axis_dim, named
from codesign.sharding.rules import Rules
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.state_layout import StateLayout


class TrainProgram(StateLayout):
    """The step on a `StateLayout`: losses, the pipelined programs, the once-per-step gradient
    reduction and the update, jitted with the layout's pinned in/out shardings."""

    def __init__(self, *args, **kwargs):  # StateLayout's arguments, and the schedule's own checks
        super().__init__(*args, **kwargs)
        strategy = self.strategy
        p, v = strategy.size("pipeline"), strategy.stages_per_device
        if v > 1 and strategy.microbatches < p:
            raise StrategyError(
                f"{strategy.spec}: the interleaved pipeline (v={v}) needs microbatches >= pipeline={p} (a "
                f"microbatch must come back to the first stage before its next chunk); use microbatches={p}"
            )
        if self.one_f_one_b and (problem := schedule_problem(strategy.microbatches, p, v)):
            raise StrategyError(f"{strategy.spec}: {problem}")

    # -- computation -------------------------------------------------------------------------
    def _model(self, params) -> Transformer:
        state = jax.tree.map(lambda v: v, self._abstract[1])  # a fresh State to fill, not the cached one
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    @property
    def one_f_one_b(self) -> bool:
        """The pipeline runs in 1F1B order (`codesign.pipeline_1f1b`); gpipe and dualpipe run the
        autodiff of the forward loop (`codesign.pipeline`), whose order is GPipe's."""
        return self.pipelined and self.strategy.schedule in ("1f1b", "interleaved")

    def loss(self, params, batch):
        """batch = (tokens [b, T+1], rows [b]: their rows in the global batch, which key dropout).
        Returns (loss, cross-entropy)."""
        if self.one_f_one_b:
            return self._loss_1f1b(params, batch)
        return self._loss(params, batch)

    def _loss_1f1b(self, params, batch):
        """The loss whose gradient is computed by the 1F1B loop: the loop yields loss and gradients
        together (its backward runs inside), so it is the VJP's forward, and the backward only scales
        the gradients it saved. Evaluated without a gradient, it is the plain pipelined forward."""

        @jax.custom_vjp
        def loss(params, batch):
            return self._loss(params, batch)

        def fwd(params, batch):
            return self._value_and_grad_1f1b(params, batch)

        def bwd(grads, ct):
            return jax.tree.map(lambda g: (g * ct[0]).astype(g.dtype), grads), None

        loss.defvjp(fwd, bwd)
        return loss(params, batch)

    def _value_and_grad_1f1b(self, params, batch):
        """((loss, ce), grads) of the pipelined model, the stack run by `pipeline_1f1b.run_1f1b`. A dense
        model's embedding lookup runs in the loop; an MoE model's dense prefix (and embedding) runs
        for the whole batch before it, and its backward after it, from the first stage's input
        gradients."""
        tokens, rows = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        b, t = inputs.shape
        m, stack, coef = self.strategy.microbatches, self.pipelined_stack, self.cfg.router_aux_loss_coef
        prefix = stack == "moe_blocks" and self.cfg.dense_layers > 0
        head_keys = ("final_norm", "embed" if self.cfg.tie_embeddings else "lm_head")
        pre_keys = ("embed", "dense_blocks") if prefix else ("embed",)
        remat = self.strategy.remat

        def model_with(sub):
            return self._model({**params, **sub})

        def pre(sub):  # an MoE model's embedding and dense prefix, for the whole batch
            return self._prefix_over_stages(model_with(self.gather_prefix_tables(sub)), inputs, rows)

        def head_loss(sub, y, tgt):
            with batch_also_over("pipeline"):
                logits = model_with(sub).head(y)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

        with D.scope(D.split_rows(D.current(), rows)):
            if prefix:  # the prefix runs before the loop; its output for every microbatch is the source
                (x, aux_pre), pre_vjp = jax.vjp(pre, {k: params[k] for k in pre_keys})
                source = Source(self._split(x, m), lambda mb: mb, lambda rows_in: rows_in)
            else:  # the embedding lookup runs in the loop, one microbatch at a time
                aux_pre = jnp.zeros((), jnp.float32)
                dtype, rate = self.model_kwargs["dtype"], self.cfg.hidden_dropout
                ids = self._split(inputs, m)
                source = Source(
                    params["embed"], lambda mb: ids[mb], lambda rows_in: enter_residual(rows_in, dtype, rate)
                )
            graphdef = nnx.split(getattr(self._model(params), stack))[0]
            ce, aux, d_stack, d_head, d_source = run_1f1b(
                graphdef,
                params[stack],
                source,
                m,
                jnp.broadcast_to(jnp.arange(t), (b // m, t)),
                head_loss,
                {k: params[k] for k in head_keys},
                self._split(targets, m),
                stages=self.mesh_sizes["pipeline"],
                repeats=self.strategy.stages_per_device,
                remat=remat,
                compute_dtype=self.model_kwargs["dtype"],
                aux_weight=coef,
                first_layer=self.cfg.dense_layers if stack == "moe_blocks" else 0,
                rows=self._split(rows, m),
                n_layers=self.stack_layers[0],
                grad_dtype=self._acc_dtype,
            )
            if prefix:
                (d_pre,) = pre_vjp((_unsplit(d_source), jnp.asarray(coef, jnp.float32)))
            else:
                d_pre = {"embed": d_source}
        parts = (d_pre, d_head, {stack: d_stack})
        grads = {
            k: functools.reduce(lambda a, c: jax.tree.map(jnp.add, a, c), [d[k] for d in parts if k in d])
            for k in params
        }
        return (ce + coef * (aux_pre + aux), ce), grads

    def _loss(self, params, batch):
        tokens, rows = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with D.scope(D.split_rows(D.current(), rows)):
            if self.pipelined:
                logits, aux = self._pipelined_forward(params, inputs, rows)
            else:
                logits, aux = self._model(params)(inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + self.cfg.router_aux_loss_coef * aux, ce

    def _pipelined_forward(self, params, inputs, rows):
        """The model's forward with its stacked blocks run by the pipeline (`codesign.pipeline`)."""
        model = self._model(self.gather_prefix_tables(params))
        b, t = inputs.shape
        if self.pipelined_stack == "moe_blocks" and model.dense_blocks is not None:
            x, aux = self._prefix_over_stages(model, inputs, rows)
        else:
            x, aux = model.embed_tokens(inputs), jnp.zeros((), jnp.float32)
        m = self.strategy.microbatches
        graphdef, layers = nnx.split(getattr(model, self.pipelined_stack))
        ys, a = run_pipeline(
            graphdef,
            layers,
            self._split(x, m),
            jnp.broadcast_to(jnp.arange(t), (b // m, t)),
            stages=self.mesh_sizes["pipeline"],
            repeats=self.strategy.stages_per_device,
            remat=self.strategy.remat,
            first_layer=self.cfg.dense_layers if self.pipelined_stack == "moe_blocks" else 0,
            rows=self._split(rows, m),
            n_layers=self.stack_layers[0],
        )
        with batch_also_over("pipeline"):
            logits = model.head(_unsplit(ys))
        return logits, aux + a

    def _prefix_over_stages(self, model: Transformer, inputs, rows):
        """(x [b, T, d], aux loss) of an MoE model's embedding and dense prefix, which run before the
        pipeline on the whole batch: with the rows split over the pipeline stages too, so that each
        stage does 1/p of the prefix instead of all of it. Each batch shard's rows are padded to a
        multiple of p (token 0, row -1; their outputs are dropped, so they add nothing to the loss or
        the gradients) inside the shard, so no row moves to another shard."""
        p, (b, t) = self.mesh_sizes["pipeline"], inputs.shape
        shards = self.strategy.batch_shards
        local = b // shards
        pad = -local % p

        def widen(a, fill):  # [b, ...] -> [shards * (local + pad), ...], each shard's rows padded
            a = a.reshape(shards, local, *a.shape[1:])
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
            return a.reshape(-1, *a.shape[2:])

        if pad:
            inputs, rows = widen(inputs, 0), widen(rows, -1)
        positions = jnp.broadcast_to(jnp.arange(t), inputs.shape)
        with batch_also_over("pipeline"), D.scope(D.split_rows(D.current(), rows)):
            x, aux = run_layers(
                *nnx.split(model.dense_blocks), model.embed_tokens(inputs), positions, self.strategy.remat
            )
        if pad:
            x = x.reshape(shards, local + pad, *x.shape[1:])[:, :local].reshape(b, *x.shape[1:])
        # Every stage gets the whole output (one all-gather over pipeline per step, and its gradient's
        # reduce-scatter): the pipeline reads one microbatch of it per tick, which would otherwise
        # be a collective per tick.
        rest = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, PartitionSpec(self.batch_sharding.spec[0], *rest))
        )
        return x, aux

    def _split(self, batch, mb: int | None = None):
        """[B, ...] -> [M, B/M, ...] (each leaf of a batch tree). Row r goes to microbatch r % M, which
        keeps each microbatch spread over all batch shards (no data moves)."""
        mb = mb or self.accumulation

        def one(rows):
            return jnp.moveaxis(rows.reshape(rows.shape[0] // mb, mb, *rows.shape[1:]), 1, 0)

        return jax.tree.map(one, batch)

    def _grads_auto(self, params, batch):
        """The partitioner places every reduction (inside the loop when microbatches > 1)."""
        mb = self.accumulation
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        if mb == 1:
            (_, ce), grads = grad_fn(params, batch)
            return ce, grads

        def acc(carry, mb_batch):
            ce_sum, g_sum = carry
            (_, ce), g = grad_fn(params, mb_batch)
            return (ce_sum + ce, jax.tree.map(jnp.add, g_sum, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, self._acc_dtype), params)
        (ce_sum, g_sum), _ = jax.lax.scan(acc, (jnp.zeros((), jnp.float32), zeros), self._split(batch))
        return ce_sum / mb, jax.tree.map(lambda g: g / mb, g_sum)

    def _replica_grads(self, params, batch):
        """(ce [R], grads [R, ...]): each replica's loss and *unreduced* gradient on its rows of `batch`
        (tokens, and their global rows).

        The replica axes become an explicit leading axis (`vmap` with `spmd_axis_name`): nothing in the
        math sums over it, so no collective over those axes can run here, once per microbatch; the one
        reduction is `_reduce`. The activation rules drop those axes (vmap puts them on the new axis)."""
        r = self.replica_axes
        n = math.prod(self.mesh_sizes[a] for a in r)
        inner = Rules(tuple((name, tuple(m for m in axes if m not in r)) for name, axes in self.rules.table))
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)

        params = jax.lax.with_sharding_constraint(params, self._lookup_shardings)

        def one(replica_batch):
            with activation_sharding(self.mesh, inner):
                (_, ce), g = grad_fn(params, replica_batch)
            return ce, g

        per_replica = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        ce, g = jax.vmap(one, spmd_axis_name=r)(per_replica)
        return ce, jax.lax.with_sharding_constraint(g, named(self.mesh, self._stacked_specs))

    def _reduce(self, stacked):
        """The one reduction over the replica axes, written out (full-manual, so its layout is exact):
        psum -> param layout (zero=0), or psum_scatter over `data` on each leaf's ZeRO dimension ->
        the `data`-sharded gradient layout (zero>=1; leaves ZeRO could not shard are psum'd). ZeRO over
        `expert` is a local slice of this result (`grad_shardings`): expert parallelism leaves those
        gradients reduced over expert already."""
        r = self.replica_axes
        level = self.zero and "data" in self.zero_axes  # ZeRO over data scatters here; over expert, below
        rest = tuple(a for a in r if a != "data") if level else r

        def one(spec, x):
            x = x[0]
            if rest:
                x = jax.lax.psum(x, rest)
            if level:
                d = axis_dim(spec, "data")
                x = (
                    jax.lax.psum(x, "data")
                    if d is None
                    else jax.lax.psum_scatter(x, "data", scatter_dimension=d, tiled=True)
                )
            return x

        out_specs = self._zero[1]
        f = _compat.shard_map(
            lambda xs: jax.tree.map(one, out_specs, xs, is_leaf=self._is_spec),
            mesh=self.mesh,
            in_specs=(self._stacked_specs,),
            out_specs=out_specs,
        )
        return f(stacked)

    def _grads(self, params, batch):
        """(mean loss, mean gradient) over the global batch, reduced over the replica axes once per step
        (zero=2: once per microbatch, into a sharded accumulator)."""
        if not self.replica_axes or (self.accumulation == 1 and not self.zero):
            # Nothing to restructure: without accumulation the step reduces once anyway, and XLA picks how
            # (one all-reduce over data and expert together for an MoE's dense params; bf16 partial sums
            # on TPU). The explicit path would reduce over expert first, then over data.
            return self._grads_auto(params, batch)
        mb = self.accumulation
        n = math.prod(self.mesh_sizes[a] for a in self.replica_axes) * mb  # local means -> global mean
        cast = functools.partial(jax.tree.map, lambda x: x.astype(self._acc_dtype))
        if mb == 1:
            ce, g = self._replica_grads(params, batch)
            g = self._reduce(cast(g))
        else:
            per_mb = self.zero == 2  # ZeRO-2: the accumulator itself is sharded over data

            def acc(carry, mb_batch):
                ce_sum, g_sum = carry
                ce, g = self._replica_grads(params, mb_batch)
                if per_mb:
                    # The barrier keeps this reduce-scatter in the loop: the TPU compiler otherwise moves
                    # it out (sum of reduce-scatters = reduce-scatter of the sum), which silently turns
                    # ZeRO-2 back into ZeRO-1 (a full-size accumulator).
                    g = self._reduce(cast(g))
                    g = jax.lax.optimization_barrier(jax.lax.with_sharding_constraint(g, self.grad_shardings))
                return (ce_sum + ce, jax.tree.map(jnp.add, g_sum, g)), None

            acc_sh = self.grad_shardings if per_mb else named(self.mesh, self._stacked_specs)
            lead = () if per_mb else (n // mb,)
            zeros = jax.tree.map(
                lambda p, sh: jax.lax.with_sharding_constraint(
                    jnp.zeros(lead + p.shape, self._acc_dtype), sh
                ),
                params,
                acc_sh,
            )
            ce0 = jnp.zeros((n // mb,), jnp.float32)
            (ce, g), _ = jax.lax.scan(acc, (ce0, zeros), self._split(batch))
            g = g if per_mb else self._reduce(g)
        return ce.sum() / n, jax.tree.map(lambda x: x / n, g)

    @property
    def _acc_dtype(self):
        """Gradients accumulate over microbatches in what the optimizer updates (`Workload.update_dtype`:
        f32 with a master copy, as Megatron-LM's main_grad and DeepSeek-V3 accumulate)."""
        return jnp.dtype(dtype_name(self.workload.update_dtype))

    @property
    def has_dropout(self) -> bool:
        return self.cfg.attention_dropout > 0 or self.cfg.hidden_dropout > 0

    def _step(self, state, tokens):
        rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        draw = D.Draw(D.step_key(state["step"]), rows) if self.has_dropout else None
        with activation_sharding(self.mesh, self.rules), D.scope(draw):
            ce, grads = self._grads(state["params"], (tokens, rows))
            grads = jax.lax.with_sharding_constraint(grads, self.grad_shardings)
            # What the optimizer updates: the master copy (already sharded like the gradients), else
            # the params. Under ZeRO each replica updates only its slice (a local slice of its param
            # shard); the pinned out_shardings then all-gather the new params over the ZeRO axes.
            target = state["master"] if self.master else state["params"]
            if self.zero:
                target = jax.lax.with_sharding_constraint(target, self.grad_shardings)
            grads = jax.tree.map(lambda g, t: g.astype(t.dtype), grads, target)
            updates, opt_state = self.optimizer.update(grads, state["opt_state"], target)
            target = optax.apply_updates(target, updates)
        out = {"opt_state": opt_state, "step": state["step"] + 1}
        if self.master:
            # The params are the new master's cast, cast where the master lies (pinned there, or the
            # partitioner gathers the f32 master and casts after) and gathered back in their dtype.
            out["master"] = target
            cast = jax.tree.map(lambda m, p: m.astype(p.dtype), target, state["params"])
            out["params"] = jax.lax.with_sharding_constraint(cast, self.grad_shardings)
        else:
            out["params"] = target
        return out, {"loss": ce}

    @cached_property
    def step_fn(self):
        metrics_sh = {"loss": NamedSharding(self.mesh, PartitionSpec())}
        return jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, metrics_sh),
            donate_argnums=(0,),
        )

    def _init(self, key):
        # With a master copy, the init draws it (in its dtype) and the params are its cast.
        kw = {**self.model_kwargs, "param_dtype": self._acc_dtype}
        with nnx.use_eager_sharding(False):
            model = Transformer(self.cfg, rngs=nnx.Rngs(params=key), **kw)
        updated = self.pad_stack(nnx.to_pure_dict(nnx.state(model)))
        state = {"opt_state": self.optimizer.init(updated), "step": jnp.zeros((), jnp.int32)}
        if self.master:
            dt = self.model_kwargs["param_dtype"]
            return {**state, "master": updated, "params": jax.tree.map(lambda m: m.astype(dt), updated)}
        return {**state, "params": updated}

    def init(self, seed: int = 0) -> dict:
        """Initialize directly into the plan's shardings (nothing is materialized on one host)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.key(seed))

    def lower(self):
        return self.step_fn.lower(self.abstract_state, self.abstract_batch)

    def with_strategy(self, strategy: Strategy, mesh: Mesh) -> TrainProgram:
        return TrainProgram(
            self.cfg, self.workload, strategy, mesh, rules=None, optimizer=self.opt_cfg, strict=self.strict
        )


def _unsplit(xs):
    """The inverse of `TrainProgram._split`: [M, B/M, ...] -> [B, ...]."""
    return jnp.moveaxis(xs, 0, 1).reshape(-1, *xs.shape[2:])


def replace_workload(w: Workload, **kw) -> Workload:
    return dataclasses.replace(w, **kw)

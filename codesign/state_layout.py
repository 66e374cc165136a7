"""The training state's layout on a mesh: which param, gradient and optimizer leaf lives where.

`StateLayout` ties one (model, workload, strategy) to a mesh. It resolves every param's logical axes
through the strategy's rules (a pipelined stack's `layers` axis over `pipeline`), adds the ZeRO
shardings of gradients and optimizer moments over the pure data replicas, and builds the abstract
inputs (`ShapeDtypeStruct(sharding=...)`) that the planner lowers and the trainer initializes into.
It computes nothing; `codesign.train_step.TrainProgram` is the step that runs on this layout.

A pipelined stack whose layers do not divide by the stages is stored zero-padded to a multiple of
them (`stack_layers`, `pad_stack`); checkpoints carry the padding and restore across it
(`logical_rows`). An MoE model's dense prefix (and its embedding) is sharded over `pipeline` as well
(`_prefix_over_pipeline`). With `Workload.master_dtype` the state holds a master copy of the params,
sharded like the moments (`master`, `checkpoint_adapter`).

ZeRO (`zero=` in the strategy) over `data`: 1 = AdamW moments sharded over `data`, added after the
param's own axes on the dimension FSDP shards (`sharding.params.zero_dim`), so each replica's
optimizer shard is a slice of its own param shard; 2 = the gradient accumulator too. An MoE model's
`expert` axis splits the batch outside the experts: ZeRO shards the params it does not shard over it
as well (`zero_axes`). Where no batch axis replicates params (data of size 1 or sharding params, and
no expert axis) ZeRO is recorded as dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import axes as A
from codesign.config import ModelConfig, Workload, dtype_name
from codesign.models import build_abstract
from codesign.models.attention import kernel_for, platform_of
from codesign.pipeline import stored_layers
from codesign.sharding.params import logical_axes, named, path_str, resolve_specs, zero_specs
from codesign.sharding.rules import Dropped, Rules, default_rules
from codesign.sharding.strategy import Strategy, StrategyError


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def build(self, state_dtype: str | None = None) -> optax.GradientTransformation:
        """AdamW with clipping; `state_dtype` is the moments' dtype (`Workload.optimizer_state_dtype`)."""
        sched = optax.warmup_cosine_decay_schedule(
            0.0,
            self.learning_rate,
            max(1, self.warmup_steps),
            max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * self.min_lr_ratio,
        )
        mu_dtype = _dtype(state_dtype) if state_dtype else None
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(sched, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, mu_dtype=mu_dtype),
        )


def _dtype(name: str):
    return jnp.dtype(dtype_name(name))


class StateLayout:
    def __init__(
        self,
        cfg: ModelConfig,
        workload: Workload,
        strategy: Strategy,
        mesh: Mesh,
        *,
        rules: Rules | None = None,
        optimizer: OptimizerConfig | None = None,
        strict: bool = True,
    ):
        self.cfg, self.workload, self.strategy, self.mesh = cfg, workload, strategy, mesh
        self.rules = rules or default_rules(strategy)
        self.opt_cfg = optimizer or OptimizerConfig()
        self.strict = strict
        # The attention kernel is part of the workload (the cost model prices the same one).
        # On the mesh's platform (`models.attention.kernel_for`: flash -> cuDNN, splash or the reference).
        self.attention_impl = kernel_for(workload.attention, platform_of(mesh))
        self.mesh_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
        b = workload.global_batch
        shards = self.strategy.batch_shards
        if b % shards:
            raise StrategyError(
                f"global batch {b} is not divisible by the batch shards "
                f"data*fsdp*expert={shards} of {strategy.spec}"
            )
        if (b // shards) % strategy.microbatches:
            raise StrategyError(
                f"per-shard batch {b // shards} is not divisible by microbatches={strategy.microbatches}"
            )
        # With a pipeline, `microbatches` are the pipeline's: they flow through the stages in one pass,
        # and the gradient is the sum over them (Megatron's num_microbatches), so nothing accumulates
        # outside the pipeline.
        self.pipelined = strategy.size("pipeline") > 1
        self.accumulation = 1 if self.pipelined else strategy.microbatches
        self.model_kwargs = {
            "dtype": _dtype(workload.dtype),
            "param_dtype": _dtype(workload.param_dtype),
            "remat": strategy.remat,
            "attention_impl": self.attention_impl,
        }

    # -- abstract structure ------------------------------------------------------------------

    @cached_property
    def _abstract(self):
        model = build_abstract(self.cfg, **self.model_kwargs)
        graphdef, state = nnx.split(model)
        return graphdef, state

    @property
    def graphdef(self):
        return self._abstract[0]

    @cached_property
    def logical_axes(self) -> dict:
        return logical_axes(self._abstract[1])

    @cached_property
    def _shapes(self):
        """The params' shapes as stored (`pad_stack`)."""
        return self.pad_stack(nnx.to_pure_dict(self._abstract[1]))

    @cached_property
    def _param_specs(self) -> tuple[Any, tuple[Dropped, ...]]:
        shapes = self._shapes
        specs, dropped = resolve_specs(shapes, self.logical_axes, self.rules, self.mesh_sizes, self.strict)
        if self.pipelined:
            specs = self._stage_specs(specs)
            specs, more = self._prefix_over_pipeline(specs)
            dropped += more
        return specs, dropped

    @property
    def prefix_keys(self) -> tuple[str, ...]:
        """Params that run only in an MoE model's dense prefix, before the pipeline (the dense blocks,
        and the embedding unless the head shares it); empty without a prefix."""
        if not (self.pipelined and self.pipelined_stack == "moe_blocks" and self.cfg.dense_layers):
            return ()
        return ("dense_blocks",) + (() if self.cfg.tie_embeddings else ("embed",))

    def gather_prefix_tables(self, params):
        """`params` with the embedding table gathered over `pipeline` (its spec without it), for the
        prefix's lookup: the table is sharded over the stages at rest, and looking up into a sharded
        table from rows also split over the stages leaves the partitioner to rematerialize the
        looked-up rows (and their gradient) instead. One gather of the table per step, and its
        gradient's reduce-scatter."""
        if "embed" not in self.prefix_keys:
            return params

        def drop(spec):
            kept = [
                tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a != "pipeline") for e in spec
            ]
            return PartitionSpec(*(k[0] if len(k) == 1 else k or None for k in kept))

        table = jax.lax.with_sharding_constraint(
            params["embed"], NamedSharding(self.mesh, drop(self.param_specs["embed"]))
        )
        return {**params, "embed": table}

    def _prefix_over_pipeline(self, specs):
        """The prefix's params sharded over `pipeline` too (ZeRO-3 over the stages). The prefix runs
        once per step on the whole batch split over the stages (`train_step`), so every stage uses
        all of its weights; gathering them when it runs (and reduce-scattering their gradients) spares
        each stage holding them whole. It is the SPMD counterpart of a pipeline whose first stage alone
        holds the embedding and the dense layers."""
        keys = self.prefix_keys
        if not keys:
            return specs, ()
        sub = {k: specs[k] for k in keys}
        shapes = {k: self._shapes[k] for k in keys}
        axes = {k: self.logical_axes[k] for k in keys}
        sub, dropped = zero_specs(sub, shapes, axes, self.rules, self.mesh_sizes, 3, axis="pipeline")
        return {**specs, **sub}, dropped

    @property
    def pipelined_stack(self) -> str:
        """The stacked blocks the pipeline runs: the MoE stack of an MoE model (its dense prefix runs
        before the pipeline, as in MaxText), else the dense stack."""
        return "moe_blocks" if self.cfg.moe_layers else "dense_blocks"

    @cached_property
    def stack_layers(self) -> tuple[int, int]:
        """(layers, stored rows) of the pipelined stack: an uneven split is stored zero-padded to a
        multiple of the pipeline (`pipeline.stored_layers`), so that each stage holds its own layers
        and no more. Checkpoints hold the padded rows; a restore pads or truncates them to the rows
        of its own layout (`Checkpointer`'s `rows`), and their digests cover the real layers only."""
        n = self.cfg.moe_layers if self.pipelined_stack == "moe_blocks" else self.cfg.dense_layers
        return n, stored_layers(n, self.mesh_sizes["pipeline"]) if self.pipelined else n

    def _in_stack(self, path, leaf) -> bool:
        """Whether a state leaf is one of the pipelined stack's (params, gradients, AdamW moments)."""
        n = self.stack_layers[0]
        keys = {getattr(k, "key", None) for k in path}
        return self.pipelined_stack in keys and getattr(leaf, "ndim", 0) > 0 and leaf.shape[0] >= n

    def pad_stack(self, tree):
        """`tree` (params, or a state holding them) with the pipelined stack's leaves zero-padded from
        its layers to the rows it is stored with. The padding layers are masked out of the forward
        (`pipeline.layer_mask`), so their gradients, moments and weights stay zero."""
        n, rows = self.stack_layers
        if rows == n:
            return tree

        def one(path, a):
            if not self._in_stack(path, a) or a.shape[0] != n:
                return a
            if isinstance(a, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype)
            widths = [(0, rows - n)] + [(0, 0)] * (a.ndim - 1)
            return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)

        return jax.tree_util.tree_map_with_path(one, tree)

    def logical_rows(self, tree) -> dict[str, int]:
        """{leaf path ('a/b' as `train.integrity.leaves_by_path` writes it): its real rows} of the
        stack's leaves in `tree` (padded here or not: a checkpoint saved under another layout may be):
        what a `Checkpointer` digests and restores them by."""
        n = self.stack_layers[0]
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {
            jax.tree_util.keystr(path, simple=True, separator="/"): n
            for path, leaf in flat
            if self._in_stack(path, leaf)
        }

    def _stage_specs(self, specs):
        """The pipelined stack's `layers` dimension sharded over `pipeline` in contiguous blocks, one per
        device (stored padded when the split is uneven: `stack_layers`): for V=1 that is the stage
        layout itself, so the step moves no params. For V > 1 a device runs chunks s, s + p, ..., so
        the step's reordering (`pipeline.to_stage_layout`) moves (V-1)/V of the stack's params over
        `pipeline` each step, and their gradients back (storing the stage layout instead would avoid
        it; checkpoints keep the logical order either way)."""

        def one(spec):
            head = spec[0] if len(spec) else None
            if head is not None:  # a rules file already placed the layers axis
                return spec
            return PartitionSpec("pipeline", *spec[1:])

        stack = jax.tree.map(one, specs[self.pipelined_stack], is_leaf=self._is_spec)
        return {**specs, self.pipelined_stack: stack}

    @property
    def param_specs(self):
        return self._param_specs[0]

    @property
    def dropped_rules(self) -> tuple[Dropped, ...]:
        """Param rules that could not be honoured, and ZeRO shardings that could not be applied."""
        return self._param_specs[1] + self._zero[3]

    @cached_property
    def param_shardings(self):
        return named(self.mesh, self.param_specs)

    @cached_property
    def abstract_params(self):
        shapes = self._shapes
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.param_shardings
        )

    @cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return self.opt_cfg.build(self.workload.optimizer_state_dtype)

    # -- data replicas and ZeRO --------------------------------------------------------------
    @cached_property
    def replica_axes(self) -> tuple[str, ...]:
        """Mesh axes (size > 1) that split the batch and shard no param: pure data replicas, over which
        gradients are accumulated unreduced and reduced once per step. In batch-spec order."""
        used = {
            a
            for spec in jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
            for e in spec
            if e is not None
            for a in ((e,) if isinstance(e, str) else e)
        }
        return tuple(a for a in self._batch_axes if self.mesh_sizes.get(a, 1) > 1 and a not in used)

    @cached_property
    def _batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch sharding splits the rows over, in its order."""
        entry = self.batch_sharding.spec[0] if len(self.batch_sharding.spec) else None
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    @cached_property
    def zero_axes(self) -> tuple[str, ...]:
        """The batch axes ZeRO shards over, each for the params it replicates: `data` when it is a pure
        replica axis, and `expert` (an MoE model's batch axis outside its experts) for the params
        expert parallelism does not shard, as Megatron-LM's distributed optimizer and DeepSeek-V3's
        ZeRO-1 shard over the whole data-parallel group, expert ranks included."""
        axes = ("data",) if "data" in self.replica_axes else ()
        if self.cfg.is_moe and self.mesh_sizes.get("expert", 1) > 1 and "expert" in self._batch_axes:
            axes += ("expert",)
        return axes

    @cached_property
    def _zero(self) -> tuple[int, Any, Any, tuple[Dropped, ...]]:
        """(level in effect, the specs the once-per-step reduction writes (ZeRO over `data`), the
        gradient/optimizer-state specs (over every ZeRO axis), what could not be sharded)."""
        level = self.strategy.zero
        if level == 0:
            return 0, self.param_specs, self.param_specs, ()
        if not self.zero_axes:
            why = (
                "the data axis has size 1"
                if self.mesh_sizes.get("data", 1) == 1
                else "the rules shard params over data, so it is not a pure replica axis"
            )
            return (
                0,
                self.param_specs,
                self.param_specs,
                (Dropped("opt_state", f"zero={level}", "data", f"{why}; zero ignored"),),
            )
        shapes = self._shapes
        specs, dropped = self.param_specs, ()
        reduced = specs
        for axis in self.zero_axes:
            specs, more = zero_specs(
                specs, shapes, self.logical_axes, self.rules, self.mesh_sizes, level, axis=axis
            )
            dropped += more
            if axis == "data":
                reduced = specs
        return level, reduced, specs, dropped

    @property
    def zero(self) -> int:
        """The ZeRO level in effect (the strategy's, or 0 where no batch axis replicates a param)."""
        return self._zero[0]

    @cached_property
    def grad_shardings(self):
        """Reduced gradients and optimizer moments: the param shardings, plus the ZeRO axes under ZeRO."""
        return named(self.mesh, self._zero[2])

    @cached_property
    def opt_state_shardings(self):
        """Optimizer leaves mirror their param's gradient sharding (matched by path suffix); scalars
        replicate."""
        by_path = {
            tuple(path_str(p).split("/")): sh
            for p, sh in jax.tree_util.tree_flatten_with_path(self.grad_shardings)[0]
        }
        abstract = jax.eval_shape(self.optimizer.init, self.abstract_params)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def pick(path, leaf):
            keys = tuple(path_str(path).split("/"))
            for i in range(len(keys)):
                sh = by_path.get(keys[i:])
                if sh is not None and len(sh.spec) <= leaf.ndim:
                    return sh
            return replicated

        return jax.tree_util.tree_map_with_path(pick, abstract)

    @property
    def master(self) -> bool:
        """Whether the state holds a master copy of the params (`Workload.master_dtype`): the optimizer
        updates it, sharded like the gradients and moments (so ZeRO shards it too)."""
        return self.workload.master_dtype is not None

    @cached_property
    def state_shardings(self) -> dict:
        out = {
            "params": self.param_shardings,
            "opt_state": self.opt_state_shardings,
            "step": NamedSharding(self.mesh, PartitionSpec()),
        }
        if self.master:
            out["master"] = self.grad_shardings
        return out

    @cached_property
    def abstract_state(self) -> dict:
        updated = self.abstract_params
        if self.master:
            dt = _dtype(self.workload.master_dtype)
            updated = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), updated)
        abstract = {
            "params": self.abstract_params,
            "opt_state": jax.eval_shape(self.optimizer.init, updated),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        if self.master:
            abstract["master"] = updated
        return jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, self.state_shardings
        )

    def checkpoint_adapter(self, saved: dict) -> tuple[Any, Any] | None:
        """For `Checkpointer(adapt=...)`: a state saved with a master copy restores into a layout
        without one and the other way round. Given the saved leaves ({path: (shape, dtype)}): None
        when they are in this layout's form, else (the abstract state to read them as, on this mesh,
        and the conversion to this layout's state: the most precise copy of the params, the master
        where there is one, becomes both the master and the params; the moments take this layout's
        dtype)."""
        masters = [dt for p, (_, dt) in saved.items() if p.startswith("master/")]
        if bool(masters) == self.master:
            return None
        param_dtype = next(dt for p, (_, dt) in saved.items() if p.startswith("params/"))
        wl = dataclasses.replace(
            self.workload,
            param_dtype=np.dtype(param_dtype).name,
            master_dtype=np.dtype(masters[0]).name if masters else None,
        )
        source = StateLayout(
            self.cfg,
            wl,
            self.strategy,
            self.mesh,
            rules=self.rules,
            optimizer=self.opt_cfg,
            strict=self.strict,
        )
        target = self.abstract_state

        def like(tree, abstract):
            return jax.tree.map(lambda x, t: x.astype(t.dtype), tree, abstract)

        def convert(state):
            best = state.get("master", state["params"])
            out = {"step": state["step"], "opt_state": like(state["opt_state"], target["opt_state"])}
            out["params"] = like(best, target["params"])
            if self.master:
                out["master"] = like(best, target["master"])
            return out

        return source.abstract_state, lambda state: jax.jit(convert, out_shardings=self.state_shardings)(
            state
        )

    @cached_property
    def batch_sharding(self) -> NamedSharding:
        spec, _ = self.rules.resolve(
            (A.ACT_BATCH, None),
            (self.workload.global_batch, self.workload.seq_len + 1),
            self.mesh_sizes,
            path="batch",
            strict=False,
        )
        return NamedSharding(self.mesh, spec)

    @property
    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        w = self.workload
        return jax.ShapeDtypeStruct((w.global_batch, w.seq_len + 1), jnp.int32, sharding=self.batch_sharding)

    # -- computation -------------------------------------------------------------------------

    def _is_spec(self, x) -> bool:
        return isinstance(x, PartitionSpec)

    @cached_property
    def _stacked_specs(self):
        """Unreduced per-replica gradients: a leading axis over the replica axes, then the param's spec."""
        r = self.replica_axes
        return jax.tree.map(lambda s: PartitionSpec(r, *s), self.param_specs, is_leaf=self._is_spec)

    @cached_property
    def _lookup_shardings(self):
        """Lookup tables (first axis `vocab`: the embedding) gathered over fsdp before the lookup, as FSDP
        does for every weight before use. Without it, the partitioner meets a gather from a
        [vocab/tensor, embed/fsdp] table with [data, batch/fsdp] indices by all-gathering the looked-up
        activations over data, once per microbatch (seen on the cpu and v5e targets)."""

        def one(axes, spec):
            if not axes or axes[0] != A.VOCAB:
                return spec
            kept = [tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a != "fsdp") for e in spec]
            return PartitionSpec(*(k[0] if len(k) == 1 else k or None for k in kept))

        specs = jax.tree.map(one, self.logical_axes, self.param_specs, is_leaf=lambda x: isinstance(x, tuple))
        return named(self.mesh, specs)

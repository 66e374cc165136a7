"""The train step shared by the planner (lowered from abstract inputs) and the trainer (executed).

`TrainProgram` ties one (model, workload, strategy) to a mesh: it resolves every param's logical
axes through the strategy's rules, builds abstract inputs (`ShapeDtypeStruct(sharding=...)`), and
jits the step with pinned in/out shardings so that FSDP gradients reduce-scatter instead of
all-reducing. Loss: next-token cross-entropy + MoE aux loss; AdamW with f32 master params,
bf16 compute, global-norm clipping, warmup+cosine schedule and gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codesign import axes as A
from codesign.config import ModelConfig, Workload
from codesign.models import build_abstract
from codesign.models.transformer import Transformer
from codesign.sharding.activation import activation_sharding
from codesign.sharding.params import logical_axes, named, path_str, resolve_specs
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

    def build(self) -> optax.GradientTransformation:
        sched = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, max(1, self.warmup_steps), max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * self.min_lr_ratio)
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(sched, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay))


def _dtype(name: str):
    return jnp.dtype({"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}.get(name, name))


class TrainProgram:
    def __init__(self, cfg: ModelConfig, workload: Workload, strategy: Strategy, mesh: Mesh, *,
                 rules: Rules | None = None, optimizer: OptimizerConfig | None = None, strict: bool = True):
        self.cfg, self.workload, self.strategy, self.mesh = cfg, workload, strategy, mesh
        self.rules = rules or default_rules(strategy)
        self.opt_cfg = optimizer or OptimizerConfig()
        self.strict = strict
        # The attention kernel is part of the workload (the cost model prices the same one).
        self.attention_impl = workload.attention_impl
        self.mesh_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
        b = workload.global_batch
        shards = self.strategy.batch_shards
        if b % shards:
            raise StrategyError(f"global batch {b} is not divisible by the batch shards "
                                f"data*fsdp*expert={shards} of {strategy.spec}")
        if (b // shards) % strategy.microbatches:
            raise StrategyError(f"per-shard batch {b // shards} is not divisible by microbatches={strategy.microbatches}")
        self.model_kwargs = dict(dtype=_dtype(workload.dtype), param_dtype=_dtype(workload.param_dtype),
                                 remat=strategy.remat, attention_impl=self.attention_impl)

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
    def _param_specs(self) -> tuple[Any, tuple[Dropped, ...]]:
        shapes = nnx.to_pure_dict(self._abstract[1])
        return resolve_specs(shapes, self.logical_axes, self.rules, self.mesh_sizes, self.strict)

    @property
    def param_specs(self):
        return self._param_specs[0]

    @property
    def dropped_rules(self) -> tuple[Dropped, ...]:
        return self._param_specs[1]

    @cached_property
    def param_shardings(self):
        return named(self.mesh, self.param_specs)

    @cached_property
    def abstract_params(self):
        shapes = nnx.to_pure_dict(self._abstract[1])
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.param_shardings)

    @cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return self.opt_cfg.build()

    @cached_property
    def opt_state_shardings(self):
        """Optimizer leaves mirror their param's sharding (matched by path suffix); scalars replicate."""
        by_path = {tuple(path_str(p).split("/")): sh for p, sh in
                   jax.tree_util.tree_flatten_with_path(self.param_shardings)[0]}
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

    @cached_property
    def state_shardings(self) -> dict:
        return {"params": self.param_shardings, "opt_state": self.opt_state_shardings,
                "step": NamedSharding(self.mesh, PartitionSpec())}

    @cached_property
    def abstract_state(self) -> dict:
        abstract = {"params": self.abstract_params,
                    "opt_state": jax.eval_shape(self.optimizer.init, self.abstract_params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            abstract, self.state_shardings)

    @cached_property
    def batch_sharding(self) -> NamedSharding:
        spec, _ = self.rules.resolve((A.ACT_BATCH, None), (self.workload.global_batch, self.workload.seq_len + 1),
                                     self.mesh_sizes, path="batch", strict=False)
        return NamedSharding(self.mesh, spec)

    @property
    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        w = self.workload
        return jax.ShapeDtypeStruct((w.global_batch, w.seq_len + 1), jnp.int32, sharding=self.batch_sharding)

    # -- computation -------------------------------------------------------------------------
    def _model(self, params) -> Transformer:
        state = jax.tree.map(lambda v: v, self._abstract[1])  # a fresh State to fill, not the cached one
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def loss(self, params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, aux = self._model(params)(inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + self.cfg.router_aux_loss_coef * aux, ce

    def _grads(self, params, tokens):
        mb = self.strategy.microbatches
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        if mb == 1:
            (_, ce), grads = grad_fn(params, tokens)
            return ce, grads
        # Row r goes to microbatch r % mb, which keeps each microbatch spread over all batch shards.
        b = tokens.shape[0]
        split = jnp.moveaxis(tokens.reshape(b // mb, mb, -1), 1, 0)

        def acc(carry, mb_tokens):
            ce_sum, g_sum = carry
            (_, ce), g = grad_fn(params, mb_tokens)
            return (ce_sum + ce, jax.tree.map(jnp.add, g_sum, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (ce_sum, g_sum), _ = jax.lax.scan(acc, (jnp.zeros((), jnp.float32), zeros), split)
        return ce_sum / mb, jax.tree.map(lambda g: g / mb, g_sum)

    def _step(self, state, tokens):
        with activation_sharding(self.mesh, self.rules):
            ce, grads = self._grads(state["params"], tokens)
            grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
            updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": ce}

    @cached_property
    def step_fn(self):
        metrics_sh = {"loss": NamedSharding(self.mesh, PartitionSpec())}
        return jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, metrics_sh), donate_argnums=(0,))

    def _init(self, key):
        with nnx.use_eager_sharding(False):
            model = Transformer(self.cfg, rngs=nnx.Rngs(params=key), **self.model_kwargs)
        params = nnx.to_pure_dict(nnx.state(model))
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def init(self, seed: int = 0) -> dict:
        """Initialize directly into the plan's shardings (nothing is materialized on one host)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.key(seed))

    def lower(self):
        return self.step_fn.lower(self.abstract_state, self.abstract_batch)

    def with_strategy(self, strategy: Strategy, mesh: Mesh) -> TrainProgram:
        return TrainProgram(self.cfg, self.workload, strategy, mesh, rules=None, optimizer=self.opt_cfg,
                            strict=self.strict)


def replace_workload(w: Workload, **kw) -> Workload:
    return dataclasses.replace(w, **kw)

"""The closed form's view of a model on a layout: every param with its logical axes and shard
factor, and the per-device shape of one microbatch.

`sharded_params` resolves each through the strategy's rules (non-strict, as the planner does) so that
the shard factor of every param is the one `TrainProgram` would use. `act_layout` resolves the
activations the models pin (`sharding.activation`: the residual stream, a norm's output as a block
reads it, the attention heads, the FFN intermediate, the logits) through the same rules and the same
`activation_spec` the program's constraints call, so a `rules=FILE` strategy is costed with the layout
it is compiled with (`sp=1` is the default rules' `act_norm_seq -> [sequence, tensor]`). The
closed-form report (`program.py`) and the memory model (`memory.py`) both read these tables.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.config import ModelConfig, Workload
from codesign.sharding.activation import FFN, GATHERED, HEADS, LOGITS, RESIDUAL, activation_spec, mesh_axes_of
from codesign.sharding.param_table import ParamGroup, param_groups
from codesign.sharding.rules import Rules, default_rules
from codesign.sharding.strategy import Strategy


@dataclass(frozen=True)
class ShardedParam:
    group: ParamGroup
    count: float  # copies per device program: layers of its stack (per pipeline stage), 1 for global
    axes: tuple[str, ...]  # mesh axes that shard it (after non-strict resolution)
    shards: int

    @property
    def local_elems(self) -> float:
        return self.group.elems / self.shards


def spmd_sizes(strategy: Strategy) -> dict[str, int]:
    """The SPMD mesh of one pipeline stage: every axis but `pipeline`."""
    return {a: n for a, n in strategy.mesh if a != "pipeline"}


def sharded_params(cfg: ModelConfig, strategy: Strategy) -> tuple[ShardedParam, ...]:
    # Keyed by what the param layout depends on: remat, microbatches and sp variants of one mesh share it.
    return _sharded_params(cfg, strategy.mesh, strategy.rules_file)


@functools.lru_cache(maxsize=64)
def _rules(mesh: tuple, rules_file: str | None, sp: bool) -> Rules:
    return default_rules(Strategy(mesh=mesh, rules_file=rules_file, sp=sp))


def strategy_rules(strategy: Strategy) -> Rules:
    """The logical->mesh table `TrainProgram` compiles this strategy with (read once per file)."""
    return _rules(strategy.mesh, strategy.rules_file, strategy.sp)


def prefix_split(cfg: ModelConfig, stages: int) -> bool:
    """Whether an MoE model's dense prefix runs before the pipeline, its batch split over the `stages`
    (`train_step`): its params are on every device, its work and its gradients' reduction span
    `pipeline` like a batch axis, once per step."""
    return stages > 1 and cfg.moe_layers > 0 and cfg.dense_layers > 0


@functools.lru_cache(maxsize=4096)
def _sharded_params(cfg: ModelConfig, mesh: tuple, rules_file: str | None) -> tuple[ShardedParam, ...]:
    strategy = Strategy(mesh=mesh, rules_file=rules_file)
    rules = _rules(mesh, rules_file, False)
    sizes = spmd_sizes(strategy)
    p = strategy.size("pipeline")
    dense, moe = stage_layers(cfg, p)
    prefix = prefix_split(cfg, p)
    if prefix:  # every device runs the whole prefix (split over the batch), its layers sharded over p
        dense = cfg.dense_layers
    out = []
    for g in param_groups(cfg):
        spec, _ = rules.resolve(g.logical, g.shape, sizes, path=g.name, strict=False)
        axes = tuple(a for e in spec if e for a in ((e,) if isinstance(e, str) else e))
        count = {"dense": dense, "moe": moe, "global": 1.0}[g.where]
        shards = math.prod(sizes[a] for a in axes)
        if prefix and _prefix_only(cfg, g) and _divides(spec, g.shape, sizes, p):
            axes, shards = (*axes, "pipeline"), shards * p  # `StateLayout._prefix_over_pipeline`
        out.append(ShardedParam(g, count, axes, shards))
    return tuple(out)


def _prefix_only(cfg: ModelConfig, g: ParamGroup) -> bool:
    """Params only an MoE model's dense prefix uses: its layers, and the embedding unless the head
    shares it (`StateLayout.prefix_keys`)."""
    return g.where == "dense" or (g.name == "embed" and not cfg.tie_embeddings)


def _divides(spec, shape, sizes: dict[str, int], n: int) -> bool:
    """Whether some dimension of `shape` divides by its mesh axes in `spec` times n (where
    `sharding.params.zero_dim` can add one more axis of size n)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    for dim, e in zip(shape, entries):
        have = math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e or ()))
        if dim % (have * n) == 0:
            return True
    return False


@dataclass(frozen=True)
class ActLayout:
    """How the rules split the activations the models pin, as per-device widths per token of the
    t = b x s tokens a device holds under the strategy's batch and sequence sharding: an activation
    split further (the residual over tensor under sp, or an embed dim a rules file maps to tensor) has a
    narrower width, one split less (a batch the rules leave replicated) a wider one."""

    res: float  # the residual stream between blocks (and a norm's input), of width d
    gathered: float  # a norm's output as the next block reads it, of width d
    heads: float  # query heads (of n) per device in q and the attention context
    kv_heads: float  # key/value heads per device (MLA: its up-projected heads, n)
    ffn: float  # the FFN intermediate, of width mlp_dim (MoE: of one expert's width moe_mlp_dim)
    vocab: float  # the logits, of width vocab_size
    res_tensor: bool  # the residual stream is sharded over tensor: tensor reductions into it scatter


@functools.lru_cache(maxsize=4096)
def _act_layout(
    cfg: ModelConfig, mesh: tuple, rules_file: str | None, sp: bool, rows: int, seq: int
) -> ActLayout:
    rules, sizes = _rules(mesh, rules_file, sp), {a: n for a, n in mesh if a != "pipeline"}
    # The default split of tokens: what b x s assumes (batch over the batch axes, positions over sequence).
    tokens = math.prod(sizes[a] for a in Strategy(mesh=mesh).batch_axes) * sizes["sequence"]

    def width(layout, shape) -> float:
        spec = activation_spec(rules, layout, shape, sizes)
        shards = math.prod(sizes[a] for dim in mesh_axes_of(spec) for a in dim)
        return math.prod(shape[2:]) * tokens / shards

    d = cfg.hidden
    res_axes = mesh_axes_of(activation_spec(rules, RESIDUAL, (rows, seq, d), sizes))
    return ActLayout(
        res=width(RESIDUAL, (rows, seq, d)),
        gathered=width(GATHERED, (rows, seq, d)),
        heads=width(HEADS, (rows, seq, cfg.heads, 1)),
        kv_heads=width(HEADS, (rows, seq, cfg.heads if cfg.attention == "mla" else cfg.kv_heads, 1)),
        ffn=width(FFN, (rows, seq, cfg.mlp_dim or cfg.moe_mlp_dim)),  # the dense (or shared) FFN
        vocab=width(LOGITS, (rows, seq, cfg.vocab_size)),
        res_tensor=any("tensor" in dim for dim in res_axes),
    )


def act_layout(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> ActLayout:
    rows = workload.global_batch // strategy.microbatches
    return _act_layout(cfg, strategy.mesh, strategy.rules_file, strategy.sp, rows, workload.seq_len)


def sp_active(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> bool:
    """Whether the residual stream is sharded over tensor (sp=1, or a rules file that maps
    act_norm_seq or act_embed there): the activation rules resolve non-strictly, so positions that do
    not split over sequence*tensor leave it unsharded (the enumerator never offers that)."""
    return act_layout(cfg, workload, strategy).res_tensor


@dataclass(frozen=True)
class Shape:
    """Per-device sizes of one strategy: what every formula above is written in."""

    b: float  # rows per device per microbatch
    s: float  # positions per device
    seq: int  # full sequence length
    m: int  # microbatches
    sizes: dict
    cap: int  # MoE expert capacity per routing group
    act: ActLayout  # the activations' widths as the rules split them
    groups: float = 1.0  # MoE routing groups per row on this device (context parallelism splits them)

    @property
    def t(self) -> float:
        return self.b * self.s


def shape_of(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> Shape:
    sizes = spmd_sizes(strategy)
    m = strategy.microbatches
    b = workload.global_batch / (strategy.batch_shards * m)
    cap = groups = 0
    if cfg.is_moe:
        per_row = workload.seq_len // cfg.routing_group(workload.seq_len)
        groups = per_row / sizes["sequence"] if per_row % sizes["sequence"] == 0 else per_row
        cap = cfg.expert_capacity(cfg.routing_group(workload.seq_len))
    s = workload.seq_len / sizes["sequence"]
    return Shape(b, s, workload.seq_len, m, sizes, cap, act_layout(cfg, workload, strategy), groups)


def moe_slots(cfg: ModelConfig, sh: Shape) -> float:
    """Dispatched token slots per device per microbatch: (E/expert) x (B/(data*fsdp*m)) x (routing
    groups per row / sequence) x C. Every batch-like axis divides it."""
    z = sh.sizes
    return (cfg.n_routed_experts / z["expert"]) * sh.b * z["expert"] * sh.groups * sh.cap


def replica_axes(cfg: ModelConfig, strategy: Strategy) -> tuple[str, ...]:
    """Batch axes (size > 1) that shard no param: the pure data replicas over which the train step
    accumulates gradients unreduced and reduces them once per step (`TrainProgram.replica_axes`)."""
    used = {a for sp in sharded_params(cfg, strategy) for a in sp.axes}
    return tuple(a for a in strategy.batch_axes if strategy.size(a) > 1 and a not in used)


@functools.lru_cache(maxsize=4096)  # asked per param per candidate by the memory model and collectives
def zero_axes(cfg: ModelConfig, strategy: Strategy) -> tuple[str, ...]:
    """The batch axes ZeRO shards over (`StateLayout.zero_axes`): `data` where it is a replica axis,
    and an MoE model's `expert` axis for the params expert parallelism does not shard."""
    axes = ("data",) if "data" in replica_axes(cfg, strategy) else ()
    if cfg.is_moe and strategy.size("expert") > 1:
        axes += ("expert",)
    return axes


def zero_level(cfg: ModelConfig, strategy: Strategy) -> int:
    """The ZeRO level in effect: the strategy's, where a batch axis replicates params (else nothing to
    shard)."""
    return strategy.zero if zero_axes(cfg, strategy) else 0


def zero_shards(cfg: ModelConfig, strategy: Strategy, sp: ShardedParam) -> int:
    """How many ways ZeRO divides this param's optimizer state: its ZeRO axes it is not sharded over."""
    if not zero_level(cfg, strategy):
        return 1
    return math.prod(strategy.size(a) for a in zero_axes(cfg, strategy) if a not in sp.axes)


def pipeline_transfers(
    cfg: ModelConfig, workload: Workload, strategy: Strategy
) -> tuple[tuple[str, float], ...]:
    """(kind, bytes per device) of the collectives over `pipeline` that run once per step outside the
    tick loop, which the one-stage report leaves out: an MoE dense prefix's output gathered to every
    stage and its gradient reduced back (bf16), and its weights, sharded over the stages, gathered
    (the layers for its forward and its backward, the embedding for its lookup) and their gradients
    reduce-scattered (ZeRO-3 over pipeline: `StateLayout._prefix_over_pipeline`)."""
    p = strategy.size("pipeline")
    out: list[tuple[str, float]] = []
    if prefix_split(cfg, p):
        table = workload.global_batch / strategy.batch_shards * workload.seq_len * cfg.hidden * 2
        out += [("all-gather", table), ("all-reduce", table)]
        sharded = [sp for sp in sharded_params(cfg, strategy) if "pipeline" in sp.axes]
        layers = sum(sp.local_elems * sp.count * p for sp in sharded if sp.group.where == "dense")
        table = sum(sp.local_elems * p for sp in sharded if sp.group.where != "dense")
        # The layers are gathered for the forward and again for the backward; the embedding for its
        # lookup only (its gradient needs the token ids, not the table). Each gradient reduce-scatters.
        moves = [("all-gather", layers), ("all-gather", layers), ("all-gather", table)]
        moves.append(("reduce-scatter", layers + table))
        out += [(kind, n * workload.param_bytes) for kind, n in moves if n]
    return tuple(out)

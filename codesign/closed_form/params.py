"""The closed form's view of a model on a layout: every param with its logical axes and shard
factor, and the per-device shape of one microbatch.

`sharded_params` resolves each through the strategy's rules (non-strict, as the planner does) so that
the shard factor of every param is the one `TrainProgram` would use. The closed-form report
(`program.py`) and the memory model (`memory.py`) both read this one table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.config import ModelConfig, Workload
from codesign.sharding.enumerate import sp_problem
from codesign.sharding.param_table import ParamGroup, param_groups
from codesign.sharding.rules import default_rules
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


@functools.lru_cache(maxsize=4096)
def _sharded_params(cfg: ModelConfig, mesh: tuple, rules_file: str | None) -> tuple[ShardedParam, ...]:
    strategy = Strategy(mesh=mesh, rules_file=rules_file)
    rules = default_rules(strategy)
    sizes = spmd_sizes(strategy)
    p = strategy.size("pipeline")
    out = []
    for g in param_groups(cfg):
        spec, _ = rules.resolve(g.logical, g.shape, sizes, path=g.name, strict=False)
        axes = tuple(a for e in spec if e for a in ((e,) if isinstance(e, str) else e))
        count = {"dense": stage_layers(cfg, p)[0], "moe": stage_layers(cfg, p)[1], "global": 1.0}[g.where]
        out.append(ShardedParam(g, count, axes, math.prod(sizes[a] for a in axes)))
    return tuple(out)


@dataclass(frozen=True)
class Shape:
    """Per-device sizes of one strategy: what every formula above is written in."""

    b: float  # rows per device per microbatch
    s: float  # positions per device
    seq: int  # full sequence length
    m: int  # microbatches
    sizes: dict
    cap: int  # MoE expert capacity per routing group
    groups: float = 1.0  # MoE routing groups per row on this device (context parallelism splits them)

    @property
    def t(self) -> float:
        return self.b * self.s


def sp_active(workload: Workload, strategy: Strategy) -> bool:
    """Whether sp=1 really shards the residual: the activation rules resolve non-strictly, so positions
    that do not split over sequence*tensor leave it unsharded (the enumerator never offers that)."""
    return strategy.sp and sp_problem(workload, strategy.sizes) is None


def shape_of(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> Shape:
    sizes = spmd_sizes(strategy)
    m = strategy.microbatches
    b = workload.global_batch / (strategy.batch_shards * m)
    cap = groups = 0
    if cfg.is_moe:
        per_row = workload.seq_len // cfg.routing_group(workload.seq_len)
        groups = per_row / sizes["sequence"] if per_row % sizes["sequence"] == 0 else per_row
        cap = cfg.expert_capacity(cfg.routing_group(workload.seq_len))
    return Shape(b, workload.seq_len / sizes["sequence"], workload.seq_len, m, sizes, cap, groups)


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


def zero_level(cfg: ModelConfig, strategy: Strategy) -> int:
    """The ZeRO level in effect: the strategy's, where `data` is a replica axis (else nothing to shard)."""
    return strategy.zero if "data" in replica_axes(cfg, strategy) else 0

"""Enumerate every valid parallelism layout of a model on N devices.

A layout is a factorization of N over the mesh axes. It is valid when the model can use each
axis (expert parallelism only for MoE, pipeline only when layers divide) and every dimension the
rules shard divides by its mesh axes (asked of the rules themselves, so a `rules=FILE` table is
checked as written). Rejections are counted by reason so that the
planner can report them.

Microbatches are searched per layout up to its per-replica batch (`microbatch_counts`: the powers of
two below it and the per-replica batch itself, one sequence per microbatch as the published pipelined
runs use). A pipelined layout (pipeline > 1) is tried with each schedule and, for `interleaved`, each
V > 1 that divides its layers per stage. Whether a schedule can run a microbatch count is
`closed_form/pipeline.py`'s rule, a layer above this one: the planner applies it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from codesign.arithmetic import pipelined_layers
from codesign.axes import MESH_AXES
from codesign.config import ModelConfig, Workload
from codesign.sharding.param_table import param_groups
from codesign.sharding.rules import Rules, default_rules
from codesign.sharding.slices import slice_problem, slice_reason_key
from codesign.sharding.strategy import Strategy, batch_shards


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """All ordered k-tuples of positive integers whose product is n."""
    if k == 1:
        yield (n,)
        return
    for d in divisors(n):
        for rest in factorizations(n // d, k - 1):
            yield (d,) + rest


def microbatch_counts(per_replica_batch: int) -> list[int]:
    """Microbatch counts worth searching for a replica holding `per_replica_batch` sequences: the
    powers of two that divide it, and the per-replica batch (one sequence per microbatch)."""
    counts = [m for m in (2**i for i in range(per_replica_batch.bit_length())) if per_replica_batch % m == 0]
    return sorted({*counts, max(per_replica_batch, 1)})


def pipeline_options(cfg: ModelConfig, pipeline: int, schedules: Sequence[str]) -> list[tuple[str, int]]:
    """(schedule, V) pairs to try on a pipeline of this size: V = 1 for gpipe, 1f1b and dualpipe;
    every V > 1 dividing the layers per stage for interleaved (1f1b with V > 1 is interleaved)."""
    if pipeline <= 1:
        return [("1f1b", 1)]
    layers = pipelined_layers(cfg, pipeline)
    out = []
    for sched in schedules:
        if sched == "interleaved":
            out += [(sched, v) for v in divisors(layers) if v > 1]
        else:
            out.append((sched, 1))
    return out


def layout_problem(
    cfg: ModelConfig,
    workload: Workload,
    sizes: dict[str, int],
    microbatches: int = 1,
    rules: Rules | None = None,
) -> str | None:
    """Why this mesh cannot run the model (None when it can).

    Which weight dimensions must divide by which mesh axes is the rules' business, so it is asked of
    the rules the layout will run with (`rules`, default: the defaults for this mesh): every param of
    the model is resolved, and a dimension a rule shards but cannot divide rejects the layout unless
    the rules let that logical axis replicate (`Rules.may_replicate`).
    """
    p, e, s = (sizes.get(a, 1) for a in ("pipeline", "expert", "sequence"))
    if e > 1 and not cfg.is_moe:
        return "expert parallelism needs an MoE model"
    if p > 1 and (p > cfg.layers or (cfg.is_moe and p > cfg.moe_layers)):
        return f"pipeline={p} has more stages than layers ({cfg.layers})"
    if p > 1 and workload.mode != "train":
        return "pipeline parallelism is costed for training only"
    shards = batch_shards(sizes)
    if workload.global_batch % (shards * microbatches):
        return (
            f"global batch {workload.global_batch} not divisible by data*fsdp*expert*microbatches="
            f"{shards * microbatches}"
        )
    if workload.seq_len % s:
        return f"seq_len {workload.seq_len} not divisible by sequence={s}"
    rules = rules if rules is not None else default_rules()
    spmd = {a: n for a, n in sizes.items() if a != "pipeline"}
    for g in param_groups(cfg):
        _, dropped = rules.resolve(g.logical, g.shape, spmd, path=g.name, strict=False)
        for d in dropped:
            if d.logical not in rules.may_replicate:
                return f"{d.logical} not divisible by {d.mesh_axis} ({d.path}: {d.reason})"
    return None


@dataclass
class Enumeration:
    valid: list[Strategy] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return len(self.valid) + sum(self.rejected.values())


def _reason_key(reason: str) -> str:
    """Reasons grouped for the report: "heads not divisible by tensor", not one row per size."""
    return reason.split(" (")[0] if " not divisible by " in reason else reason


def sp_problem(workload: Workload, sizes: dict[str, int]) -> str | None:
    """Why sequence parallelism in the tensor group cannot shard this layout's residual stream (None
    when it can): it needs a tensor group, and positions that split over sequence*tensor."""
    t, s = sizes.get("tensor", 1), sizes.get("sequence", 1)
    if t == 1:
        return "sp=1 needs tensor > 1"
    if workload.seq_len % (s * t):
        return f"sp=1: seq_len {workload.seq_len} not divisible by sequence*tensor={s * t}"
    return None


def enumerate_strategies(
    cfg: ModelConfig,
    workload: Workload,
    n_devices: int,
    *,
    remats: Sequence[str] = ("full",),
    microbatches: Iterable[int] | None = (1,),
    axes: Sequence[str] = MESH_AXES,
    rules: Rules | None = None,
    sps: Sequence[bool] = (False,),
    schedules: Sequence[str] = ("1f1b",),
    slices: int = 1,
) -> Enumeration:
    """Every factorization of n_devices over `axes` x remat x microbatches x sp (x schedule and V
    where pipeline > 1), split into valid/rejected. `microbatches=None`: each layout's
    `microbatch_counts`. `rules`: the table the layouts will run with (default: the default rules).
    `sps`: the sequence parallelism settings to try; sp=True is only tried where the layout has a
    tensor group it can use (otherwise it would be the same strategy as sp=False). `slices`: TPU
    slices over DCN; a layout (in the default axis order) whose tensor, sequence or expert axis
    would cross them is rejected."""
    out = Enumeration()
    given = None if microbatches is None else tuple(microbatches)
    layouts = {}  # the rules' verdict on a mesh does not depend on microbatches: ask once
    for sizes_t in factorizations(n_devices, len(axes)):
        sizes = dict(zip(axes, sizes_t))
        sp_opts = [sp for sp in sps if not sp or sp_problem(workload, sizes) is None]
        variants = len(remats) * max(1, len(sp_opts))
        p = sizes.get("pipeline", 1)
        pipes = pipeline_options(cfg, p, schedules)
        per_replica = workload.global_batch // batch_shards(sizes)
        mbs = given if given is not None else microbatch_counts(max(per_replica, 1))
        crossing = slice_problem([(a, sizes.get(a, 1)) for a in MESH_AXES], slices)
        for mb in mbs:
            key = tuple(sizes_t) if workload.global_batch % (batch_shards(sizes) * mb) == 0 else None
            if key is not None and key in layouts:
                problem = layouts[key]
            else:
                problem = layout_problem(cfg, workload, sizes, mb, rules)
                if key is not None:
                    layouts[key] = problem
            if problem or crossing:  # the model's own reason first; then the slices'
                reason = _reason_key(problem) if problem else slice_reason_key(crossing)
                out.rejected[reason] += variants * len(pipes)
                continue
            for sched, v in pipes:
                for sp in sp_opts:
                    for remat in remats:
                        out.valid.append(
                            Strategy.make(
                                sizes,
                                remat=remat,
                                microbatches=mb,
                                sp=sp,
                                schedule=sched,
                                stages_per_device=v,
                            )
                        )
    return out

"""Enumerate every valid parallelism layout of a model on N devices.

A layout is a factorization of N over the mesh axes. It is valid when the model can use each
axis (expert parallelism only for MoE, pipeline only when layers divide) and every dimension the
rules shard divides by its mesh axes (asked of the rules themselves, so a `rules=FILE` table is
checked as written). Rejections are counted by reason so that the
planner can report them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

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
    microbatches: Iterable[int] = (1,),
    axes: Sequence[str] = MESH_AXES,
    rules: Rules | None = None,
    sps: Sequence[bool] = (False,),
    slices: int = 1,
) -> Enumeration:
    """Every factorization of n_devices over `axes` x remat x microbatches x sp, split into valid/rejected.
    `rules`: the table the layouts will run with (default: the default rules). `sps`: the sequence
    parallelism settings to try; sp=True is only tried where the layout has a tensor group it can use
    (otherwise it would be the same strategy as sp=False). `slices`: TPU slices over DCN; a layout (in
    the default axis order) whose tensor, sequence or expert axis would cross them is rejected."""
    out = Enumeration()
    mbs = tuple(microbatches)
    for sizes_t in factorizations(n_devices, len(axes)):
        sizes = dict(zip(axes, sizes_t))
        sp_opts = [sp for sp in sps if not sp or sp_problem(workload, sizes) is None]
        crossing = slice_problem([(a, sizes.get(a, 1)) for a in MESH_AXES], slices)
        for mb in mbs:
            problem = layout_problem(cfg, workload, sizes, mb, rules)
            if problem or crossing:  # the model's own reason first; then the slices'
                key = _reason_key(problem) if problem else slice_reason_key(crossing)
                out.rejected[key] += len(remats) * max(1, len(sp_opts))
                continue
            for sp in sp_opts:
                for remat in remats:
                    out.valid.append(Strategy.make(sizes, remat=remat, microbatches=mb, sp=sp))
    return out

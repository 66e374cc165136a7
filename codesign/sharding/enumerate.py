"""Enumerate every valid parallelism layout of a model on N devices.

A layout is a factorization of N over the mesh axes. It is valid when the model can use each
axis (expert parallelism only for MoE, pipeline only when layers divide) and every dimension the
default rules shard divides by its mesh axes. Rejections are counted by reason so that the
planner can report them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from codesign.axes import MESH_AXES
from codesign.config import ModelConfig, Workload
from codesign.sharding.strategy import Strategy


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


def layout_problem(cfg: ModelConfig, workload: Workload, sizes: dict[str, int], microbatches: int = 1) -> str | None:
    """Why this mesh cannot run the model (None when it can). Checks the dims the default rules shard."""
    p, d, f, e, s, t = (sizes.get(a, 1) for a in ("pipeline", "data", "fsdp", "expert", "sequence", "tensor"))
    if e > 1 and not cfg.is_moe:
        return "expert parallelism needs an MoE model"
    if e > 1 and cfg.n_routed_experts % e:
        return f"experts {cfg.n_routed_experts} not divisible by expert={e}"
    if p > 1 and (p > cfg.layers or (cfg.is_moe and p > cfg.moe_layers)):
        return f"pipeline={p} has more stages than layers ({cfg.layers})"
    if p > 1 and workload.mode != "train":
        return "pipeline parallelism is costed for training only"
    batch_shards = d * f * e
    if workload.global_batch % (batch_shards * microbatches):
        return f"global batch {workload.global_batch} not divisible by data*fsdp*expert*microbatches={batch_shards * microbatches}"
    if workload.seq_len % s:
        return f"seq_len {workload.seq_len} not divisible by sequence={s}"
    if cfg.heads % t:
        return f"heads {cfg.heads} not divisible by tensor={t}"
    widths = ([cfg.mlp_dim] if cfg.dense_layers else []) + ([cfg.moe_mlp_dim] if cfg.is_moe else [])
    for w in widths:
        if w % t:
            return f"FFN width {w} not divisible by tensor={t}"
    if cfg.hidden % f:
        return f"hidden {cfg.hidden} not divisible by fsdp={f}"
    return None


@dataclass
class Enumeration:
    valid: list[Strategy] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return len(self.valid) + sum(self.rejected.values())


def _reason_key(reason: str) -> str:
    return reason.split(" not divisible")[0] + (" not divisible" if "not divisible" in reason else "")


def enumerate_strategies(cfg: ModelConfig, workload: Workload, n_devices: int, *,
                         remats: Sequence[str] = ("full",), microbatches: Iterable[int] = (1,),
                         axes: Sequence[str] = MESH_AXES) -> Enumeration:
    """Every factorization of n_devices over `axes` x remat x microbatches, split into valid/rejected."""
    out = Enumeration()
    mbs = tuple(microbatches)
    for sizes_t in factorizations(n_devices, len(axes)):
        sizes = dict(zip(axes, sizes_t))
        for mb in mbs:
            problem = layout_problem(cfg, workload, sizes, mb)
            if problem:
                out.rejected[_reason_key(problem)] += len(remats)
                continue
            for remat in remats:
                out.valid.append(Strategy.make(sizes, remat=remat, microbatches=mb))
    return out

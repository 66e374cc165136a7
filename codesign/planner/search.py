"""The search: enumerate -> drop invalid and hopeless -> analytic score -> compile the top K -> re-cost -> rank.

Compiled evidence can overturn the analytic ranking (a predicted winner does not fit, or runs
slower than estimated). The search then keeps compiling down the analytic order until K candidates
that fit are verified, or the list (or `max_compiles`) ends.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from codesign.arithmetic import param_counts
from codesign.axes import MESH_AXES
from codesign.config import ConfigError, ModelConfig, Workload
from codesign.cost.estimate import Estimate, estimate_analytic, estimate_from_report
from codesign.hardware.catalog import Hardware
from codesign.plan_file import Plan
from codesign.planner.constraints import Constraint
from codesign.planner.explain import explain
from codesign.report import CompileReport
from codesign.sharding.enumerate import enumerate_strategies
from codesign.sharding.slices import slice_problem
from codesign.sharding.strategy import Strategy

REMATS = ("none", "full", "dots")  # scored for every layout
# Scored for the layouts of the best REFINE_TOP candidates (by rank, and by step time alone so that a
# fast layout that only misses memory gets its cheaper-memory variants): the policies between none and
# full (dots_nobatch and save_dot_except_mlpwi save what minimal and save_dot_except_mlp save in a dense
# layer, so they would only repeat them; offload is left out while the cost model does not price the
# host transfers), and sequence parallelism in the tensor group with every policy.
REFINE_REMATS = ("selective", "minimal", "save_dot_except_mlp", "save_qkv_proj")
SPS = (False, True)
# ZeRO levels tried for the refined layouts that have data replicas (zero=0 is every layout's base).
ZEROS = (1, 2)
REFINE_TOP = 200
MICROBATCHES = (1, 2, 4, 8)
ORDER_SEARCH_TOP = 200  # candidates whose alternative axis orders are scored too


@dataclass
class PlanRequest:
    cfg: ModelConfig
    hardware: Hardware
    workload: Workload
    n_devices: int
    target: str = "auto"
    top_k: int = 4  # candidates that must be verified by a compile (when the target compiles)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 600.0
    constraints: tuple[Constraint, ...] = ()
    headroom: float = 0.0  # extra fraction of HBM to keep free, on top of the catalog's reserve
    exhaustive: bool = False
    max_compiles: int | None = None
    max_compile_devices: int | None = None
    remats: tuple[str, ...] = REMATS
    # None: REFINE_REMATS and SPS when `remats` is left at REMATS; a caller that narrows `remats` gets
    # exactly those policies, without sp, unless it names these too.
    refine_remats: tuple[str, ...] | None = None
    sps: tuple[bool, ...] | None = None
    zeros: tuple[int, ...] | None = None  # None: ZEROS when `remats` is left at REMATS
    microbatches: tuple[int, ...] = MICROBATCHES
    axis_orders: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    executor: str = "local"  # the measuring loop's executor: "local" worker processes or "ray"
    # Reports from earlier plans of the same model/workload/target (a sweep over hardware knobs):
    # a strategy found here is re-costed under this request's hardware instead of recompiled.
    reuse: dict[str, CompileReport] | None = None
    progress: Callable[[str, int, int], None] | None = None  # (label, done, total)


@dataclass
class Scored:
    strategy: Strategy
    estimate: Estimate
    report: CompileReport | None = None

    @property
    def compiled(self) -> bool:
        return self.report is not None

    def fits(self, headroom: float, capacity: int) -> bool:
        return self.estimate.fits and self.estimate.memory_per_device_bytes <= capacity * (1 - headroom)


def _orders(strategy: Strategy, hardware: Hardware) -> list[Strategy]:
    """Axis orders worth trying: which mesh axis gets the innermost (fastest) network level.

    Orders that differ only in where size-1 axes sit are the same layout and are tried once.
    """
    inner = hardware.levels[0].group_size if hardware.levels else strategy.n_devices
    if strategy.n_devices <= inner:
        return [strategy]  # the whole mesh shares one level: order cannot matter
    seen: dict[tuple[str, ...], Strategy] = {}
    for innermost in (None, "fsdp", "expert", "data", "sequence"):
        if innermost and strategy.sizes[innermost] == 1:
            continue
        order = (
            MESH_AXES if innermost is None else tuple(a for a in MESH_AXES if a != innermost) + (innermost,)
        )
        key = tuple(a for a in order if strategy.sizes[a] > 1)
        candidate = strategy if innermost is None else strategy.replace(order=order)
        if slice_problem(candidate.mesh, hardware.slice_count) is None:  # nothing but data/fsdp on DCN
            seen.setdefault(key, candidate)
    return list(seen.values())


def _layout(s: Strategy) -> tuple:
    """The mesh and microbatches of a candidate: what its remat and sp variants share."""
    return s.mesh, s.microbatches


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def _state_bytes_lower_bound(cfg: ModelConfig, s: Strategy, zero: int = 0) -> float:
    """f32 params + grads + Adam moments (16 B/param), as finely as this layout can shard them; with
    `zero` the moments (1) and gradients (2) are also divided over the data replicas."""
    pc = param_counts(cfg)
    sizes = s.sizes
    dense_shards = sizes["fsdp"] * sizes["tensor"] * sizes["pipeline"]
    if cfg.is_moe:
        expert_params = cfg.moe_layers * cfg.n_routed_experts * 3 * cfg.hidden * cfg.moe_mlp_dim
        per_device = (pc.total - expert_params) / dense_shards + expert_params / (
            dense_shards * sizes["expert"]
        )
    else:
        per_device = pc.total / dense_shards
    d = sizes["data"]
    per_param = {0: 16.0, 1: 8 + 8 / d, 2: 4 + 12 / d}[zero if d > 1 else 0]
    return per_param * per_device


def _measure_batch(
    req: PlanRequest, target: str, batch: list[Scored], done_so_far: int, total: int, cache
) -> int:
    """Measure `batch` with the one measuring loop, filling `.report` and re-costing each. Returns the
    reports served without compiling (reuse map or cache)."""
    from codesign.compile.measure import MeasureStats, measure
    from codesign.compile.worker import CompileRequest

    stats = MeasureStats()
    done = [done_so_far]

    def progress(i: int, report: CompileReport) -> None:
        done[0] += 1
        if req.progress:
            req.progress("compiling", done[0], total)

    requests = [
        CompileRequest(
            req.cfg,
            req.workload,
            sc.strategy,
            req.hardware,
            target,
            max_compile_devices=req.max_compile_devices,
        )
        for sc in batch
    ]
    reports = measure(
        requests,
        workers=req.workers,
        timeout_s=req.timeout_s,
        cache=cache,
        reuse=req.reuse,
        progress=progress,
        executor=req.executor,
        stats=stats,
    )
    for sc, report in zip(batch, reports):
        sc.report = report
        sc.estimate = estimate_from_report(req.cfg, req.workload, sc.strategy, req.hardware, report)
    return stats.served_without_compiling


def _sort_key(sc: Scored, req: PlanRequest):
    capacity = req.hardware.memory_capacity_bytes
    failed = sc.report is not None and sc.report.outcome in ("error", "timeout")
    return (
        failed,
        not sc.fits(req.headroom, capacity),
        sc.estimate.step_time_s,
        sc.estimate.memory_per_device_bytes,
    )


def plan(req: PlanRequest) -> Plan:
    from codesign.compile.targets import resolve_target

    t0 = time.perf_counter()
    cfg, w, hw = req.cfg, req.workload, req.hardware
    if req.n_devices > 1 and math.gcd(w.global_batch, req.n_devices) == 1:
        raise ConfigError(
            f"global batch {w.global_batch} shares no factor with {req.n_devices} devices, so no "
            f"data-parallel split exists; use a multiple of {_smallest_factor(req.n_devices)}"
        )
    target = resolve_target(req.target, hw)
    capacity = hw.memory_capacity_bytes

    # 1-2. Enumerate and drop what is invalid or can never fit.
    default = tuple(req.remats) == REMATS
    refine_remats = req.refine_remats if req.refine_remats is not None else (REFINE_REMATS if default else ())
    sps = req.sps if req.sps is not None else (SPS if default else (False,))
    zeros = req.zeros if req.zeros is not None else (ZEROS if default else ())
    remats = tuple(dict.fromkeys(tuple(req.remats) + tuple(refine_remats)))
    en = enumerate_strategies(
        cfg,
        w,
        req.n_devices,
        remats=remats,
        sps=sps,
        microbatches=[m for m in req.microbatches if m == 1 or w.global_batch % m == 0],
        slices=hw.slice_count,
    )
    rejected: Counter = Counter(en.rejected)
    candidates: list[Strategy] = []
    for s in en.valid:
        if any(not c(s) for c in req.constraints):
            rejected["excluded by --strategy-filter/--fix"] += 1
            continue
        if _state_bytes_lower_bound(cfg, s, max(zeros, default=0)) > capacity * (1 - req.headroom):
            rejected["weights+optimizer state alone exceed HBM"] += 1
            continue
        candidates.append(s)
    if not candidates:
        reasons = "; ".join(f"{k}: {v}" for k, v in rejected.most_common(4)) or "no factorization"
        raise ConfigError(
            f"no valid layout of {cfg.name} on {req.n_devices} devices ({reasons}). Try another "
            f"device count, a global batch divisible by more factors, or fewer constraints"
        )

    # 3. Analytic score for every survivor in the default axis order; then try the other axis
    #    orders (which mesh axis gets the fastest network level) for the best of them.
    base = [s for s in candidates if s.remat in req.remats and not s.sp]
    refine = [s for s in candidates if not (s.remat in req.remats and not s.sp)]
    if not base:  # constraints pinned a refinement (e.g. --fix remat=minimal): score those directly
        base, refine = refine, []
    scored = [Scored(s, estimate_analytic(cfg, w, s, hw)) for s in base]
    scored.sort(key=lambda sc: _sort_key(sc, req))
    if refine:  # the other policies and sp, for the layouts worth refining
        by_time = sorted(scored, key=lambda sc: sc.estimate.step_time_s)
        keep = {_layout(sc.strategy) for sc in scored[:REFINE_TOP] + by_time[:REFINE_TOP]}
        scored += [Scored(s, estimate_analytic(cfg, w, s, hw)) for s in refine if _layout(s) in keep]
        scored.sort(key=lambda sc: _sort_key(sc, req))
    if zeros:  # ZeRO-1/2 for the best layouts with data replicas (optimizer state, then gradients, over data)
        by_time = sorted(scored, key=lambda sc: sc.estimate.step_time_s)
        seen = {sc.strategy for sc in scored}
        for sc in {id(x): x for x in scored[:REFINE_TOP] + by_time[:REFINE_TOP]}.values():
            if sc.strategy.size("data") > 1 and sc.strategy.zero == 0:
                for z in zeros:
                    s = sc.strategy.replace(zero=z)
                    if s not in seen and all(c(s) for c in req.constraints):
                        seen.add(s)
                        scored.append(Scored(s, estimate_analytic(cfg, w, s, hw)))
        scored.sort(key=lambda sc: _sort_key(sc, req))
    if req.axis_orders:
        for sc in scored[:ORDER_SEARCH_TOP]:
            scored += [Scored(o, estimate_analytic(cfg, w, o, hw)) for o in _orders(sc.strategy, hw)[1:]]
        scored.sort(key=lambda sc: _sort_key(sc, req))
    n_analytic = len(scored)

    # 4-6. Measure down the analytic order on the target until K fitting candidates are verified
    #      (on the analytic target this re-reads the closed form: microseconds, nothing compiled).
    from codesign.compile.cache import CompileCache

    cache = CompileCache(req.cache_dir) if req.use_cache else None
    compiled = 0
    hits = 0
    limit = len(scored) if req.exhaustive else (req.max_compiles or max(3 * req.top_k, req.top_k + 4))
    want = len(scored) if req.exhaustive else req.top_k
    total = min(limit, len(scored))
    i = 0
    while i < len(scored) and compiled < limit:
        verified = sum(
            1 for sc in scored[:i] if sc.compiled and sc.report.ok and sc.fits(req.headroom, capacity)
        )
        if verified >= want:
            break
        batch = scored[i : i + min(max(1, req.workers), want - verified, limit - compiled)]
        hits += _measure_batch(req, target, batch, compiled, total, cache)
        compiled += len(batch)
        i += len(batch)
    if req.progress:  # the search may stop early: the bar ends where the work ended
        req.progress("compiling", compiled, compiled)

    # 5. Rank: verified candidates that fit first, then the rest of the analytic order.
    verified_fit = [sc for sc in scored if sc.compiled and sc.report.ok and sc.fits(req.headroom, capacity)]
    others = [sc for sc in scored if sc not in verified_fit]
    verified_fit.sort(key=lambda sc: _sort_key(sc, req))
    others.sort(key=lambda sc: (not sc.compiled,) + _sort_key(sc, req))
    ranked = verified_fit + others
    chosen = next(
        (
            i
            for i, sc in enumerate(ranked)
            if sc.fits(req.headroom, capacity) and not (sc.report and not sc.report.ok)
        ),
        None,
    )

    rows = []
    for rank, sc in enumerate(ranked, 1):
        row = {
            "rank": rank,
            "strategy": sc.strategy.to_json(),
            **sc.estimate.to_json(),
            "fits": sc.fits(req.headroom, capacity),
            "compiled": sc.compiled,
        }
        if sc.report is not None:
            row["compile"] = {
                "outcome": sc.report.outcome,
                "message": sc.report.message[:500],
                "compile_s": round(sc.report.compile_s, 2),
                "notes": list(sc.report.notes),
            }
        rows.append(row)
    wall = time.perf_counter() - t0
    pc = param_counts(cfg)
    return Plan(
        model={
            "name": cfg.name,
            "params_total": pc.total,
            "params_active": pc.active,
            "config": cfg.to_json(),
        },
        hardware={
            "name": hw.name,
            "devices": req.n_devices,
            "slices": hw.slice_count,
            "platform": hw.platform,
            "memory_capacity_bytes": capacity,
            "peak_bf16_flops": hw.peak_flops.get("bf16"),
        },
        workload=w.to_json(),
        search={
            "enumerated": en.total,
            "pruned": sum(rejected.values()),
            "scored": n_analytic,
            "compiled": compiled,
            "cache_hits": hits,
            "target": target,
            "wall_s": round(wall, 2),
            "candidates_per_s": round(n_analytic / wall, 1) if wall else None,
        },
        candidates=rows,
        chosen=chosen,
        rejected=dict(rejected),
        explanation=explain(rows, chosen, capacity),
        scored=[
            {
                "spec": sc.strategy.spec,
                "step_time_s": sc.estimate.step_time_s,
                "memory_per_device_bytes": sc.estimate.memory_per_device_bytes,
                "fits": sc.fits(req.headroom, capacity),
            }
            for sc in scored
        ],
    )

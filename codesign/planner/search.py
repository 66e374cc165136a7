"""The search: enumerate -> drop invalid and hopeless -> analytic score -> compile the top K -> re-cost -> rank.

Compiled evidence can overturn the analytic ranking (a predicted winner does not fit, or runs
slower than estimated). The search then keeps compiling down the analytic order until K candidates
that fit are verified, or the list (or `max_compiles`) ends.

The space reaches the published layouts: microbatches up to each layout's per-replica batch, every
pipeline schedule and V (`enumerate.py`), ZeRO levels and the remat policies between none and full.
It is pruned with a lower bound, not shrunk: candidates are scored in order of `step_lower_bound`
(model FLOPs at the candidate's matmul efficiency, stretched by its schedule's bubble), and one whose
bound exceeds the best fitting estimate found so far cannot win and is skipped.
"""

from __future__ import annotations

import functools
import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass

from codesign.arithmetic import param_counts, pipelined_layers, train_flops_per_token
from codesign.axes import MESH_AXES
from codesign.closed_form import analytic_memory
from codesign.closed_form import pipeline as PL
from codesign.closed_form.params import zero_axes
from codesign.closed_form.remat import layer_checkpointed
from codesign.config import ConfigError, ModelConfig, Workload, dtype_bytes
from codesign.cost.estimate import (
    Estimate,
    compute_dtype,
    estimate_analytic,
    estimate_from_report,
    matmul_size,
)
from codesign.hardware.catalog import Hardware
from codesign.plan_file import Plan
from codesign.planner import plan_cache
from codesign.planner.explain import explain
from codesign.planner.request import REMATS, PlanRequest
from codesign.report import CompileReport
from codesign.sharding.enumerate import enumerate_strategies
from codesign.sharding.slices import slice_problem
from codesign.sharding.strategy import Strategy

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
ORDER_SEARCH_TOP = 200  # candidates whose alternative axis orders are scored too
# The lower bound counts the model's FLOPs; the compiled stage can run slightly fewer (the heaviest
# stage's share of an uneven split is counted exactly, but e.g. a tied head or rounding is not):
# the bound keeps this margin so that it stays below every estimate (checked in tests/test_planner.py).
LOWER_BOUND_MARGIN = 0.9
PRUNED = "step lower bound exceeds the best fitting estimate"
NO_ROOM = "pipeline schedule's in-flight activations and state exceed HBM"


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


def step_lower_bound(cfg: ModelConfig, workload: Workload, s: Strategy, hardware: Hardware) -> float:
    """A step time no estimate of `s` can beat: the model's FLOPs per device at the candidate's own
    matmul efficiency (every kernel after the matmuls only adds), through its pipeline schedule with
    free transfers (the bubble only adds). Microseconds, no closed form."""
    return _pipelined_bound(s, _flop_bound_s(cfg, workload, s, hardware))


def _flop_bound_s(cfg: ModelConfig, workload: Workload, s: Strategy, hardware: Hardware) -> float:
    """The device's share of the model FLOPs at its matmul efficiency, before the schedule: a function
    of `_flop_key(s)` alone (the matmul size reads the mesh, rules, sp and microbatches)."""
    dtype = compute_dtype(workload)
    peak = hardware.peak_flops.get(dtype) or hardware.peak_flops["bf16"]
    frac = hardware.efficiency.matmul_fraction(dtype, matmul_size(cfg, workload, s))
    tokens = workload.global_batch * workload.seq_len
    device_s = LOWER_BOUND_MARGIN * _flops_per_token(cfg, workload.seq_len) * tokens
    return device_s / (s.n_devices * peak * frac)


def _flop_key(s: Strategy) -> tuple:
    return s.mesh, s.rules_file, s.sp, s.microbatches


@functools.lru_cache(maxsize=64)
def _flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len)


def _pipeline_costs(row: dict) -> tuple[float, float, float]:
    """(bubble, point-to-point, other exposed collectives) seconds of a plan row's own estimate."""
    bd = row["breakdown"]
    p2p = (
        bd["collective_s"].get("collective-permute", 0.0) if row["strategy"]["mesh"].get("pipeline") else 0.0
    )
    return bd["pipeline_bubble_s"], p2p, bd["exposed_collective_s"] - p2p


def pipeline_verdict(rows: list[dict], chosen: int | None) -> str | None:
    """Why a pipeline was or was not worth it, in the candidates' own estimates: the chosen row
    against the fastest fitting row of the other kind (pipelined vs not)."""
    if chosen is None:
        return None
    win = rows[chosen]
    piped = bool(win["strategy"]["mesh"].get("pipeline"))
    other = next(
        (r for r in rows if r["fits"] and bool(r["strategy"]["mesh"].get("pipeline")) != piped), None
    )
    if other is None:
        return None
    p_row, u_row = (win, other) if piped else (other, win)
    bubble, p2p, p_exposed = _pipeline_costs(p_row)
    u_exposed = _pipeline_costs(u_row)[2]
    head = "pipeline worth it" if piped else "pipeline not worth it"
    return (
        f"{head}: {p_row['strategy']['spec']} spends {bubble:.3g} s in its bubble and {p2p:.3g} s on "
        f"stage transfers, and exposes {p_exposed:.3g} s of other collectives against {u_exposed:.3g} s "
        f"for {u_row['strategy']['spec']} ({p_row['step_time_s']:.3g} vs {u_row['step_time_s']:.3g} s/step)"
    )


@functools.lru_cache(maxsize=64)
def _param_split(cfg: ModelConfig) -> tuple[float, float]:
    """(all params, routed-expert params) of the model."""
    expert = cfg.moe_layers * cfg.n_routed_experts * 3 * cfg.hidden * cfg.moe_mlp_dim if cfg.is_moe else 0
    return param_counts(cfg).total, expert


def _state_bytes_lower_bound(cfg: ModelConfig, workload: Workload, s: Strategy, zero: int = 0) -> float:
    """Params + grads in the params' dtype and Adam's two moments (and a master copy) in theirs
    (16 B/param with float32 params), as finely as this layout can shard them; with `zero` the
    moments (1) and gradients (2) are also divided over the batch axes that replicate each param."""
    total, expert_params = _param_split(cfg)
    sizes = s.sizes
    dense_shards = sizes["fsdp"] * sizes["tensor"] * sizes["pipeline"]
    p, moments = workload.param_bytes, 2 * dtype_bytes(workload.optimizer_state_dtype)
    moments += workload.update_bytes if workload.master_dtype else 0.0  # a master copy, sharded alike

    def per_param(d: int) -> float:  # bytes per local param with ZeRO over d replicas
        return {0: 2 * p + moments, 1: 2 * p + moments / d, 2: p + (p + moments) / d}[zero if d > 1 else 0]

    # ZeRO splits each param over the batch axes that replicate it (`closed_form.params.zero_shards`):
    # data x expert for an MoE's non-expert params, data for its routed experts.
    dense = (total - expert_params) / dense_shards
    experts = expert_params / (dense_shards * sizes["expert"]) if cfg.is_moe else 0.0
    d_dense = sizes["data"] * (sizes["expert"] if cfg.is_moe else 1)
    # DualPipe's second copy is of the stage layers only (not the embedding, head or an MoE's dense
    # prefix): count it for the routed experts alone (an MoE) or the layers beside the embeddings.
    globals_ = cfg.vocab_size * cfg.hidden * (1 if cfg.tie_embeddings else 2) / dense_shards
    extra = PL.param_copies(s.schedule) - 1
    if cfg.is_moe:
        return per_param(d_dense) * dense + per_param(sizes["data"]) * experts * (1 + extra)
    return per_param(d_dense) * (dense + extra * max(0.0, dense - globals_))


def _stage_key(s: Strategy) -> tuple:
    """What a candidate's stage work (its roofline busy time) depends on: not its microbatches,
    schedule, V or axis order."""
    return (tuple(sorted(s.sizes.items())), s.remat, s.sp, s.zero, s.rules_file)


def _pipelined_bound(s: Strategy, stage_s: float) -> float:
    """The step of `s` with a stage of `stage_s` seconds and free transfers."""
    p, v, m = s.size("pipeline"), s.stages_per_device, s.microbatches
    if p <= 1:
        return stage_s
    chunk = PL.chunk_times(stage_s, m, v, 1.0 if layer_checkpointed(s.remat) else 0.0, 0.0)
    return PL.pipeline_cost(s.schedule, p, v, m, chunk).step_s


class _Scorer:
    """Scores candidates in order of their lower bound, skipping those that cannot beat the best
    fitting estimate found so far (counted in `rejected` under PRUNED).

    Two bounds, the larger wins: `step_lower_bound` (model FLOPs, before anything is scored), and
    the roofline busy time of the same stage already scored at m0 <= m microbatches. The closed form's
    busy time does not fall as microbatches grow (the same FLOPs and activation bytes in smaller
    matmuls at a lower efficiency, weights read once per microbatch: tests/test_planner.py checks it),
    so that busy time, put through the candidate's own schedule, bounds its step.
    """

    def __init__(self, req: PlanRequest, rejected: Counter, zeros: tuple[int, ...] = ()):
        self.req, self.rejected, self.zeros = req, rejected, zeros
        self.best = math.inf  # the fastest fitting step scored so far
        self.capacity = req.hardware.memory_capacity_bytes
        self.busy: dict[tuple, dict[int, float]] = {}  # stage key -> {microbatches: busy seconds}
        self.flop_s: dict[tuple, float] = {}  # _flop_key -> _flop_bound_s
        self.prune = not req.exhaustive  # exhaustive: every valid candidate is scored and compiled

    def _fits(self, s: Strategy) -> bool:
        mem = analytic_memory(self.req.cfg, self.req.workload, s).total
        return mem <= self.capacity * (1 - self.req.headroom)

    def _zero_that_fits(self, s: Strategy) -> Strategy | None:
        """The first ZeRO level (of the search's) under which a layout that does not fit does: its
        ZeRO variants are otherwise only tried for the best scored layouts, which a rejected one is
        not (DeepSeek-V3's published DualPipe layout fits only with ZeRO-1)."""
        if s.zero or not zero_axes(self.req.cfg, s):
            return None
        for z in self.zeros:
            alt = s.replace(zero=z)
            if all(c(alt) for c in self.req.constraints) and self._fits(alt):
                return alt
        return None

    def _bound(self, s: Strategy, flop_bound: float) -> float:
        known = self.busy.get(_stage_key(s), {})
        below = [b for m0, b in known.items() if m0 <= s.microbatches]
        return max(flop_bound, _pipelined_bound(s, max(below))) if below else flop_bound

    def score(self, strategies) -> list[Scored]:
        req = self.req
        # (bound, whether it is final, tie-break, flop bound, strategy): a bound computed before the
        # stage was scored at a lower microbatch count is re-checked before scoring.
        heap = []
        for i, s in enumerate(strategies):
            key = _flop_key(s)
            if key not in self.flop_s:
                self.flop_s[key] = _flop_bound_s(req.cfg, req.workload, s, req.hardware)
            fb = _pipelined_bound(s, self.flop_s[key])  # = step_lower_bound(cfg, workload, s, hardware)
            # Within a stage, fewer microbatches and plain 1F1B first: they bound the rest.
            heap.append((fb, s.microbatches, s.stages_per_device, i, fb, s))
        heapq.heapify(heap)
        out = []
        while heap:
            bound, m, v, i, fb, s = heapq.heappop(heap)
            if self.prune and bound > self.best:  # every bound left is at least this one: none can win
                self.rejected[PRUNED] += len(heap) + 1
                break
            fresh = self._bound(s, fb)
            if fresh > bound:  # a scored sibling raised the bound: back in line
                heapq.heappush(heap, (fresh, m, v, i, fb, s))
                continue
            if self.prune and (s.schedule, s.stages_per_device) != ("1f1b", 1) and not self._fits(s):
                # The plain-1F1B sibling holds the fewest microbatches in flight and one copy of the
                # state: it stands for the layout's memory in the plan; a schedule that needs more
                # than HBM is only a rejection, unless ZeRO makes it fit.
                alt = self._zero_that_fits(s)
                if alt is None:
                    self.rejected[NO_ROOM] += 1
                    continue
                s = alt
            sc = Scored(s, estimate_analytic(req.cfg, req.workload, s, req.hardware))
            self.busy.setdefault(_stage_key(s), {})[s.microbatches] = sc.estimate.busy_s
            if sc.fits(req.headroom, self.capacity):
                self.best = min(self.best, sc.estimate.step_time_s)
            out.append(sc)
        return out


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


def search(req: PlanRequest, target: str, key: str | None, t0: float) -> Plan:
    """The search behind `plan` (request.py, which looked in the plan cache first): on compile target
    `target`, the plan stored under `key` (None: not cached), timed from `t0`."""
    cfg, w, hw = req.cfg, req.workload, req.hardware
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
        microbatches=(
            None
            if req.microbatches is None
            else [m for m in req.microbatches if m == 1 or w.global_batch % m == 0]
        ),
        schedules=req.schedules,
        slices=hw.slice_count,
    )
    rejected: Counter = Counter(en.rejected)
    candidates: list[Strategy] = []
    # The schedule rule and the state bound read a few fields of each of (often) a million strategies:
    # each verdict is computed once per distinct input.
    top_zero = max(zeros, default=0)
    layers: dict[int, int] = {}
    schedule_why: dict[tuple, str | None] = {}
    too_big: dict[tuple, bool] = {}
    for s in en.valid:
        if any(not c(s) for c in req.constraints):
            rejected["excluded by --strategy-filter/--fix"] += 1
            continue
        p = s.size("pipeline")
        sk = (s.schedule, p, s.stages_per_device, s.microbatches)
        if sk not in schedule_why:
            if p not in layers:
                layers[p] = pipelined_layers(cfg, p)
            schedule_why[sk] = PL.schedule_problem(*sk, layers[p])
        why = schedule_why[sk]
        if why:  # grouped by the rule, not the microbatch count
            rejected[why.split(" (got")[0]] += 1
            continue
        bk = (s.mesh, s.schedule)
        if bk not in too_big:
            too_big[bk] = _state_bytes_lower_bound(cfg, w, s, top_zero) > capacity * (1 - req.headroom)
        if too_big[bk]:
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
    scorer = _Scorer(req, rejected, zeros)
    scored = scorer.score(base)
    scored.sort(key=lambda sc: _sort_key(sc, req))
    if refine:  # the other policies and sp, for the layouts worth refining
        by_time = sorted(scored, key=lambda sc: sc.estimate.step_time_s)
        keep = {_layout(sc.strategy) for sc in scored[:REFINE_TOP] + by_time[:REFINE_TOP]}
        scored += scorer.score([s for s in refine if _layout(s) in keep])
        scored.sort(key=lambda sc: _sort_key(sc, req))
    if zeros:  # ZeRO-1/2 for the best layouts with data replicas (or an MoE's expert axis)
        by_time = sorted(scored, key=lambda sc: sc.estimate.step_time_s)
        seen = {sc.strategy for sc in scored}
        more = []
        for sc in {id(x): x for x in scored[:REFINE_TOP] + by_time[:REFINE_TOP]}.values():
            if zero_axes(cfg, sc.strategy) and sc.strategy.zero == 0:
                for z in zeros:
                    s = sc.strategy.replace(zero=z)
                    if s not in seen and all(c(s) for c in req.constraints):
                        seen.add(s)
                        more.append(s)
        scored += scorer.score(more)
        scored.sort(key=lambda sc: _sort_key(sc, req))
    if req.axis_orders:
        scored += scorer.score([o for sc in scored[:ORDER_SEARCH_TOP] for o in _orders(sc.strategy, hw)[1:]])
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
    verdict = pipeline_verdict(rows, chosen)
    if verdict:
        rows[chosen]["reasons"].append(verdict)
    wall = time.perf_counter() - t0
    pc = param_counts(cfg)
    result = Plan(
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
        explanation=explain(rows, chosen, capacity) + ([verdict] if verdict else []),
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
    timed_out = any(sc.report is not None and sc.report.outcome == "timeout" for sc in scored)
    if key and not timed_out:  # like the compile cache: a rerun with more time may do better
        plan_cache.store(req.cache_dir, key, result)
    return result

"""`Estimate`: step time, MFU, tokens/s and memory fit of one candidate, from a CompileReport read as data.

Model (all per device, seconds):
- busy = matmul kernels + memory-bound kernels, because a chip runs its kernels (fusions) one after
  another: the roofline's max() holds per kernel, not across the whole step (an elementwise fusion
  waiting on HBM cannot hide behind a matmul that ran before it).
    matmul kernels = max(matmul_flops / (peak[dtype] x matmul_fraction(dtype, n)),
                         matmul_bytes / (HBM x hbm fraction))
    memory-bound kernels = max((bytes_accessed - matmul_bytes) / (HBM x hbm fraction), vector)
  where vector = (flops - matmul_flops + transcendentals) / vector rate. matmul_bytes is the traffic
  of the ops that contain a matmul (the HLO walk and the analytic model both split it out; a report
  without the split counts all its bytes as memory-bound). The vector rate is the chip's fp32
  (non-tensor-core) peak when the catalog has one (H100: 67 TFLOP/s), else bf16 peak / 16
  (assumption: TPU VPUs are ~1/16 of the MXUs). Flash-attention kernels count as matmul FLOPs. n, the size fed to the
  efficiency table (measured on square n^3 matmuls), is the cube with the FLOPs of the model's
  dominant per-device matmul (tokens per device per microbatch x hidden x FFN width / tensor; experts:
  slots per expert): the table's small-n falloff is per-call overhead, which scales with FLOPs per call.
  A skinny matmul is capped at 4 x its smallest dim.
- AdamW's update (4 reads + 3 writes of f32 state per local param) is part of the compiled step, so it
  is already in bytes_accessed (the analytic report counts it there too): never added again.
- a CPU compile standing in for GPU/TPU hardware: XLA:CPU reduces gradients in f32 and writes a
  reduce-scatter as all-reduce + dynamic-slice, so its collectives would overstate accelerator
  traffic ~2-4x; like HBM traffic and memory, they come from the closed form in the hardware's
  lowering (bf16, reduce-scatter). The compile still supplies FLOPs and validity, and its collectives
  are checked against the closed form's CPU lowering: the ratio is a reason line, flagged when off by
  more than STRUCTURE_TOLERANCE (the tests pin the two within 15% on the tiny presets).
- collectives: each report row timed by `collective_time_on_axes` on the network levels
  `assign_levels(strategy.mesh, hardware)` gives each mesh axis. Groups are taken from the FULL
  strategy mesh, so a report compiled on a reduced data axis is scaled back automatically.
- overlap (`codesign.cost.overlap`): from the compiler's schedule when the report read one (a TPU/GPU
  compile: each async collective hides up to the compute XLA scheduled between its start and done,
  timed with this same roofline; synchronous ones are exposed); otherwise a per-kind model, each kind
  with its assumption: FSDP gathers under the previous layer's compute, gradient reductions under the
  next layer's backward, a once-per-step data reduction under the last microbatch's backward, tensor
  all-gather/reduce-scatter under their matmul only with collective matmul on, tensor all-reduces,
  all-to-alls and permutes exposed. `Estimate.overlap` records each row's hidden fraction and source.
- pipeline p > 1, compiled (the report's mesh has the pipeline axis): the report is the WHOLE pipelined
  step. Its loop-aware FLOPs already run every stage on every one of the M V + p - 1 ticks (the fill
  and drain included) and its collectives include the stage-to-stage collective-permutes, so the step
  is the priced program itself; the bubble reported is its (p - 1) / (M V + p - 1) share.
- pipeline p > 1, closed form or a one-stage compile: the report is ONE stage running all m microbatches: one device's work. It is
  split into per-chunk forward/backward times (`pipeline.chunk_times`) and the strategy's schedule
  (gpipe, 1f1b, interleaved with V chunks, dualpipe) prices step, bubble and point-to-point transfers
  of b x s x d x 2 / tensor bytes (Megatron's scatter/gather: each tensor rank sends its share) over
  the pipeline axis's level (`closed_form/pipeline.py`). For 1F1B-like
  schedules the bubble is the p - 1 idle ticks, (p - 1)/(V m + p - 1) of the step. DualPipe hides the
  share of the still-exposed all-to-all its paired chunks overlap (`pipeline.overlapped_fraction`).
- MFU = arithmetic.train_flops_per_token(cfg, S) x B / (step x devices x bf16 peak).
- memory: the compiler's peak when its target is the hardware's own platform (tpu-aot on TPU,
  gpu-aot on GPU, attached, cpu on cpu); otherwise (a CPU compile of GPU/TPU hardware) the analytic
  model, since CPU memory figures are not TPU/GPU figures; evidence says "+analytic-memory". Capacity
  is `hardware.memory_capacity_bytes` (HBM net of the catalog's runtime reserve). `memory_breakdown`
  names the closed form's terms (`closed_form.memory`) and the runtime reserve, whichever instrument
  gave the total, and a layout that does not fit says which terms are the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from codesign import arithmetic
from codesign.closed_form import (
    analytic_memory,
    analytic_report,
    fp8_matmul_flops,
    lowering_for,
    moe_slots,
    shape_of,
)
from codesign.closed_form import pipeline as PL
from codesign.closed_form import remat as R
from codesign.closed_form.params import pipeline_transfers, replica_axes, zero_axes, zero_level
from codesign.compile.flags import collective_matmul_on
from codesign.config import ModelConfig, Workload
from codesign.cost import overlap as O
from codesign.cost.collectives import KINDS, normalize_kind
from codesign.cost.expert_comm import expert_all_to_all_time, hides_expert_all_to_all
from codesign.cost.network import AxisPlacement, assign_levels, collective_time_on_axes
from codesign.hardware.catalog import FrozenMap, Hardware
from codesign.report import CompileReport
from codesign.sharding.strategy import Strategy
from codesign.units import fmt_bytes as _gb

STRUCTURE_TOLERANCE = 0.25
VECTOR_FRACTION_OF_BF16 = 1 / 16
_NATIVE = {"tpu": ("tpu", "attached"), "gpu": ("gpu", "attached"), "cpu": ("cpu", "attached")}


def compute_dtype(workload: Workload) -> str:
    """The catalog's dtype key for the workload's compute dtype. fp16 is its own key (a profile may
    measure it); where a chip or table has no fp16 entry, its peak and table fall back to bf16's."""
    d = workload.dtype.lower()
    if "8" in d and ("f" in d or "e4" in d or "e5" in d):
        return "fp8"
    if d in ("float16", "fp16", "f16", "half"):
        return "fp16"
    return "fp32" if d in ("float32", "fp32", "f32") else "bf16"


# A grouped GEMM over the local experts (tokens of all experts concatenated along M, one kernel) runs at
# the rate of a dense GEMM with the same total M: DeepGEMM's published H800 FP8 numbers put 8 groups x
# 4096 rows x N 4096 x K 7168 at 1288 TFLOP/s against 1304 for one dense 4096 x 4096 x 7168 GEMM
# (github.com/deepseek-ai/DeepGEMM README, "Grouped GEMMs for MoE models (contiguous layout)", Feb 2025).
# Each expert's rows are padded to the kernel's M block (128), so experts with fewer rows waste the rest.
GROUPED_GEMM_M_BLOCK = 128


def matmul_size(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> float:
    """The efficiency table's n for this candidate (see the module docstring). MoE models: the grouped
    GEMM of the local experts, sized by its total work (every local expert's slots)."""
    sh = shape_of(cfg, workload, strategy)
    tp = sh.sizes["tensor"]
    if cfg.is_moe and cfg.moe_layers >= cfg.dense_layers:
        local_experts = cfg.n_routed_experts / sh.sizes["expert"]
        per_expert = moe_slots(cfg, sh) / local_experts
        m_dim = local_experts * per_expert * min(1.0, per_expert / GROUPED_GEMM_M_BLOCK)
        n_dim = cfg.moe_mlp_dim / tp
    else:
        m_dim, n_dim = sh.t, cfg.mlp_dim / tp
    dims = (max(m_dim, 1.0), float(cfg.hidden), max(n_dim, 1.0))
    return min(math.prod(dims) ** (1 / 3), 4 * min(dims))


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    step_time_s: float
    tokens_per_s: float
    mfu: float
    memory_per_device_bytes: int
    memory_capacity_bytes: int
    fits: bool
    compute_s: float  # matmul kernels: max(FLOPs at the matmul rate, their own HBM traffic)
    memory_s: float  # memory-bound kernels' HBM traffic
    vector_s: float  # non-matmul FLOPs at the vector rate (overlaps memory_s: same kernels)
    collective_s: FrozenMap  # kind -> seconds per step, before overlap
    exposed_collective_s: float
    pipeline_bubble_s: float
    evidence: str
    reasons: tuple[str, ...]
    placements: FrozenMap  # mesh axis -> {"level", "levels", "reason"}
    # "<axes> <kind>" -> {"s": seconds before overlap, "hidden": fraction hidden, "source": "schedule" or
    # the per-kind model's class}
    overlap: FrozenMap = field(default_factory=lambda: FrozenMap({}))
    # The closed form's memory terms (bytes per device) and the runtime reserve kept out of capacity.
    memory_breakdown: FrozenMap = field(default_factory=lambda: FrozenMap({}))

    @property
    def busy_s(self) -> float:
        return busy_time(self.compute_s, self.memory_s, self.vector_s)

    @property
    def breakdown(self) -> dict[str, Any]:
        return {
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "vector_s": self.vector_s,
            "collective_s": dict(self.collective_s),
            "exposed_collective_s": self.exposed_collective_s,
            "pipeline_bubble_s": self.pipeline_bubble_s,
            "overlap": {k: dict(v) for k, v in self.overlap.items()},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.to_json(),
            "fits": self.fits,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "breakdown": self.breakdown,
            "memory_breakdown": dict(self.memory_breakdown),
            "evidence": self.evidence,
            "reasons": list(self.reasons),
            "placements": {a: dict(p) for a, p in self.placements.items()},
        }


def busy_time(compute_s: float, memory_s: float, vector_s: float) -> float:
    """Time the chip is busy computing: matmul kernels, then the memory-bound kernels (whose HBM
    traffic and vector work overlap inside each kernel)."""
    return compute_s + max(memory_s, vector_s)


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g} ms"


def _axes_of(mesh_axes, group_size: int, placements: dict[str, AxisPlacement], order) -> tuple[str, ...]:
    axes = tuple(a for a in mesh_axes if a in placements and placements[a].size > 1)
    if axes or group_size <= 1:
        return axes
    prod, picked = 1, []  # no axis names: the innermost axes whose sizes multiply to the group size
    for a in reversed(order):
        if placements[a].size > 1:
            picked.append(a)
            prod *= placements[a].size
            if prod >= group_size:
                break
    return tuple(reversed(picked))


def _kind(kind: str) -> str | None:
    kind = "all-to-all" if kind == "ragged-all-to-all" else kind
    try:
        k = normalize_kind(kind)
    except (KeyError, ValueError):
        return None
    return k if k in KINDS else None


def _native(report: CompileReport, hardware: Hardware) -> bool:
    """Whether the report's instrument targets this hardware (its memory and traffic figures apply)."""
    return report.target in _NATIVE.get(hardware.platform, ()) or report.target == "analytic"


@dataclass
class _Inputs:
    """What one estimate reads: the report, and the closed form standing in where the report cannot.

    The closed form (in the hardware's lowering) is computed at most once per candidate, and not at
    all when the report is the closed form's own or a native compile that was read back.
    """

    cfg: ModelConfig
    workload: Workload
    strategy: Strategy
    hardware: Hardware
    report: CompileReport
    _closed: CompileReport | None = None

    @property
    def closed(self) -> CompileReport:
        if self._closed is None:
            r = self.report
            same = r.target == "analytic" and r.lowering == lowering_for(self.hardware.platform).name
            self._closed = (
                r
                if same
                else analytic_report(self.cfg, self.workload, self.strategy, platform=self.hardware.platform)
            )
        return self._closed

    @property
    def native(self) -> bool:
        return _native(self.report, self.hardware)


@dataclass(frozen=True)
class _Roofline:
    compute_s: float
    memory_s: float
    vector_s: float
    reasons: tuple[str, ...]
    evidence: str
    collectives: tuple
    rates: O.Rates
    schedule: bool  # the collectives are the report's own, with overlap read from its schedule

    @property
    def busy(self) -> float:
        return busy_time(self.compute_s, self.memory_s, self.vector_s)


def _roofline(x: _Inputs) -> _Roofline:
    """Matmul kernels + memory-bound kernels, from the report or, where it has none, the closed form."""
    report, hardware, reasons = x.report, x.hardware, []
    evidence, timing = report.evidence, report
    if not report.ok:  # no numbers to time: the closed form stands in, and says so
        timing = x.closed
        reasons.append(f"compile {report.outcome}: {report.message[:120]}; step time from the analytic model")
        if report.outcome != "oom":
            evidence = "analytic"
    elif not report.hlo_analyzed:  # the compiler's memory stands; its HLO could not be read for timing
        timing = x.closed
        evidence = f"{report.evidence}-memory+analytic-time"
        reasons.append(
            "compiled (memory from the compiler), HLO unreadable: step time from the analytic model"
        )
    traffic, mm_traffic, collectives = timing.bytes_accessed, timing.matmul_bytes, timing.collectives
    if timing is report and not x.native:
        # CPU fusion and f32 lowering predict neither accelerator HBM traffic nor collective sizes (the
        # same reason memory fit comes from the analytic model): FLOPs come from the compile.
        traffic, mm_traffic, collectives = (
            x.closed.bytes_accessed,
            x.closed.matmul_bytes,
            x.closed.collectives,
        )
        reasons.append(
            f"HBM traffic and collectives from the analytic model in {hardware.platform.upper()} "
            f"lowering: {report.target} fusion and f32 all-reduces do not transfer"
        )
        if report.closed_form_collective_ratio is not None:
            ratio = report.closed_form_collective_ratio
            flag = (
                ""
                if abs(ratio - 1) <= STRUCTURE_TOLERANCE
                else " (outside the tested agreement: the closed form may miss a collective; see `codesign compile --json`)"
            )
            reasons.append(f"compiled collectives {ratio:.2f}x the closed form's (CPU lowering){flag}")
    if timing.skipped_instructions:
        reasons.append(
            f"HLO walk could not read {timing.skipped_instructions} instructions "
            f"({', '.join(timing.skipped_examples[:3])}): FLOPs and bytes may be undercounted"
        )
    dtype = compute_dtype(x.workload)
    peak = hardware.peak_flops.get(dtype) or hardware.peak_flops["bf16"]
    n = matmul_size(x.cfg, x.workload, x.strategy)
    frac = hardware.efficiency.matmul_fraction(dtype, n)
    mm_rate = peak * frac
    fp8_share, fp8_s = _fp8_part(x, n)
    if fp8_share:  # one blended rate: the weight GEMMs at the fp8 rate, the rest at the compute dtype's
        mm_rate = 1 / ((1 - fp8_share) / (peak * frac) + fp8_share * fp8_s)
        reasons.append(
            f"--matmul-dtype fp8: {fp8_share:.0%} of matmul FLOPs (weight GEMMs) at "
            f"{1 / (fp8_s * hardware.peak_flops['fp8']):.0%} of fp8 peak; attention core, head, router in {dtype}"
        )
    vector_rate = hardware.peak_flops.get("fp32") or hardware.peak_flops["bf16"] * VECTOR_FRACTION_OF_BF16
    rates = O.Rates(mm_rate, hardware.chip.hbm_bytes_per_s * hardware.efficiency.hbm, vector_rate)
    compute_s, memory_s, vector_s = rates.kernels(
        timing.flops, timing.matmul_flops, traffic, mm_traffic, timing.transcendentals
    )
    reasons.append(
        f"matmul kernels {_ms(compute_s)} at {frac:.0%} of {dtype} peak (n~{n:.0f}); "
        f"memory-bound kernels {_ms(max(memory_s, vector_s))} "
        f"({_gb(traffic - mm_traffic)} of HBM traffic)"
    )
    schedule = timing is report and x.native and report.overlap_from_schedule
    return _Roofline(
        compute_s, memory_s, vector_s, tuple(reasons), evidence, tuple(collectives), rates, schedule
    )


def _fp8_part(x: _Inputs, n: float) -> tuple[float, float]:
    """(share of the matmul FLOPs that run in FP8, seconds per FP8 FLOP) under --matmul-dtype fp8; the
    share comes from the closed form (which matmuls are weight GEMMs), applied to the report's FLOPs."""
    hw = x.hardware
    if x.workload.matmul_dtype != "fp8" or not hw.peak_flops.get("fp8"):
        return 0.0, 0.0
    closed = x.closed.matmul_flops
    share = min(1.0, fp8_matmul_flops(x.cfg, x.workload, x.strategy) / closed) if closed else 0.0
    return share, 1 / (hw.peak_flops["fp8"] * hw.efficiency.matmul_fraction("fp8", n))


@dataclass(frozen=True)
class _Network:
    by_kind: dict[str, float]
    exposed: float
    reasons: tuple[str, ...]
    overlap: FrozenMap


def _overlap_context(x: _Inputs, roof: _Roofline) -> O.Context:
    dense, moe = arithmetic.stage_layers(x.cfg, x.strategy.size("pipeline"))
    dense = math.ceil(dense)  # a prefix split over the stages is still one pass of its layers
    m = x.strategy.microbatches
    once = m > 1 or zero_level(x.cfg, x.strategy) > 0  # the train step's own once-per-step reduction
    return O.Context(
        busy_s=roof.busy,
        matmul_s=roof.compute_s,
        layers=dense + moe,
        microbatches=m,
        batch_axes=frozenset(x.strategy.batch_axes),
        step_sync_axes=frozenset(replica_axes(x.cfg, x.strategy)) if once else frozenset(),
        collective_matmul=collective_matmul_on(x.report.xla_flags),
        expert_overlap=hides_expert_all_to_all(x.strategy),
        zero_gather_axes=frozenset(zero_axes(x.cfg, x.strategy))
        if zero_level(x.cfg, x.strategy)
        else frozenset(),
    )


def _collectives(x: _Inputs, roof: _Roofline, placements: dict[str, AxisPlacement]) -> _Network:
    """Each collective timed on the network levels of its mesh axes, then the part hidden behind compute
    (from the schedule, or the per-kind model: `codesign.cost.overlap`)."""
    order = [a for a, _ in x.strategy.mesh]
    by_kind: dict[str, float] = {}
    timed = []
    for c in roof.collectives:
        kind = _kind(c.kind)
        axes = _axes_of(c.mesh_axes, c.group_size, placements, order)
        if kind is None or not axes:
            continue
        if kind == "all-to-all" and axes == ("expert",) and x.cfg.is_moe and not c.network:
            t = expert_all_to_all_time(x.cfg, c.bytes, placements) * c.count  # node-limited routing
        else:
            t = collective_time_on_axes(kind, c.bytes, axes, placements, network=c.network) * c.count
        by_kind[kind] = by_kind.get(kind, 0.0) + t
        timed.append(O.Timed(kind, axes, t, c))
    if roof.schedule:
        hidden = O.from_schedule(timed, roof.rates)
    else:
        hidden = O.from_model(timed, _overlap_context(x, roof))
    hidden = O.cap(hidden, roof.busy)
    per: dict[str, list[float]] = {}
    source: dict[str, str] = {}
    for h in hidden:
        acc = per.setdefault(h.label, [0.0, 0.0])
        acc[0] += h.seconds
        acc[1] += h.hidden
        source[h.label] = h.source
    exposed = sum(t - hid for t, hid in per.values())
    how = "from the compiler's schedule" if roof.schedule else "per-kind model"
    reasons = []
    total, hid = sum(t for t, _ in per.values()), sum(h for _, h in per.values())
    if total > 0:
        reasons.append(f"collectives {hid / total:.0%} hidden behind compute ({how})")
    for label, (t, h) in sorted(per.items(), key=lambda kv: -(kv[1][0] - kv[1][1]))[:3]:
        if t - h > 0:
            why = "" if roof.schedule else f": {O.ASSUMPTIONS.get(source[label], '')}"
            reasons.append(f"{label} exposed: {_ms(t - h)} of {_ms(t)}{why}")
    a2a = per.get("expert all-to-all")
    if a2a and x.cfg.is_moe:
        reasons.append(_a2a_reason(x, roof.busy, a2a[0], a2a[1]))
    overlap = FrozenMap(
        {
            label: FrozenMap({"s": t, "hidden": h / t if t > 0 else 0.0, "source": source[label]})
            for label, (t, h) in per.items()
        }
    )
    return _Network(by_kind, exposed, tuple(reasons), overlap)


def _a2a_reason(x: _Inputs, busy: float, a2a: float, hidden: float) -> str:
    """The expert all-to-all per MoE layer against a layer's compute, so a user sees whether it can hide
    (DeepSeek-V3 aims at about 1:1 and hides it with DualPipe)."""
    dense, moe = arithmetic.stage_layers(x.cfg, x.strategy.size("pipeline"))
    per = x.strategy.microbatches * moe
    comm = a2a / per
    compute = busy / (x.strategy.microbatches * (dense + moe))  # the stage's busy time per layer
    how = (
        f"{x.strategy.schedule} hides {hidden / a2a:.0%}"
        if hides_expert_all_to_all(x.strategy)
        else "exposed (no overlapping schedule: schedule=dualpipe hides it)"
    )
    limit = (
        f", node-limited to {x.cfg.groups_per_token} of {x.cfg.expert_groups} groups"
        if x.cfg.groups_per_token
        else ""
    )
    return (
        f"expert all-to-all per MoE layer per microbatch {_ms(comm)} vs compute {_ms(compute)} per "
        f"layer: compute:comm {compute / comm:.2f}:1{limit}; {how}"
    )


def _pipeline(
    x: _Inputs, stage_s: float, all_to_all_s: float, placements
) -> tuple[float, float, float, float, tuple[str, ...], dict[str, float]]:
    """(step, bubble, point-to-point seconds, all-to-all seconds hidden, reasons, seconds by kind of the
    once-per-step collectives over pipeline) of the candidate's schedule.

    `stage_s` is one device's work for all m microbatches (the report is one stage); the schedule
    arithmetic is `closed_form/pipeline.py`'s. The reasons weigh the pipeline in the candidate's own
    numbers: its bubble and transfers against the compute it spreads over p devices.
    """
    s = x.strategy
    p, v, m = s.size("pipeline"), s.stages_per_device, s.microbatches
    if p <= 1:
        return stage_s, 0.0, 0.0, 0.0, (), {}
    r = x.report
    if r.ok and r.hlo_analyzed and dict(r.mesh).get("pipeline", 1) > 1:  # the whole program was timed
        ticks = arithmetic.pipeline_ticks(m, p, v)
        bubble = stage_s * (p - 1) / ticks
        # Its rotations are in its collectives, unless those came from the (one-stage) closed form.
        sh = shape_of(x.cfg, x.workload, s)
        p2p = collective_time_on_axes(
            "collective-permute", sh.t * x.cfg.hidden * 2, ("pipeline",), placements
        )
        sends = 0.0 if x.native else 2 * ticks * p2p
        return (
            stage_s + sends,
            bubble,
            sends,
            0.0,
            (
                f"pipeline={p} x v={v}, {m} microbatches, compiled whole: {ticks} ticks, bubble {bubble / stage_s:.0%}",
            ),
            {},
        )
    sh = shape_of(x.cfg, x.workload, s)
    # Megatron's scatter/gather optimization (Narayanan et al. 2021, arXiv 2104.04473, sec. 4.1): the
    # tensor ranks hold the same boundary activation, so each sends 1/tensor of it over its own link.
    nbytes = sh.t * x.cfg.hidden * 2 / sh.sizes["tensor"]
    p2p = collective_time_on_axes("collective-permute", nbytes, ("pipeline",), placements)
    hidden = PL.overlapped_fraction(s.schedule, p, m, "all-to-all") * all_to_all_s
    # Assumption: every layer-checkpointing policy recomputes about one forward in backward.
    recompute = 1.0 if R.layer_checkpointed(s.remat) else 0.0
    cost = PL.pipeline_cost(s.schedule, p, v, m, PL.chunk_times(stage_s - hidden, m, v, recompute, p2p))
    level = placements["pipeline"].levels[-1] if "pipeline" in placements else "?"
    # Once per step, outside the tick loop and exposed: the MoE prefix output's gather and its gradient,
    # and the prefix weights' gathers and gradient reduce-scatter.
    outside: dict[str, float] = {}
    for kind, nbytes in pipeline_transfers(x.cfg, x.workload, s):
        outside[kind] = outside.get(kind, 0.0) + collective_time_on_axes(
            kind, nbytes, ("pipeline",), placements
        )
    once = sum(outside.values())
    reasons = [
        (
            f"pipeline={p} {s.schedule} v={v}, {m} microbatches: bubble {_ms(cost.bubble_s)} "
            f"({cost.bubble_fraction:.0%} of the step), {cost.p2p_transfers} transfers of "
            f"{_gb(nbytes)} over {level} ({_ms(cost.p2p_s)}), "
            f"{cost.in_flight:.3g} microbatches in flight"
        )
    ]
    if hidden:
        reasons.append(f"{s.schedule} hides {_ms(hidden)} of all-to-all behind the other direction")
    if once:
        reasons.append(
            f"{_ms(once)} of collectives over pipeline outside the loop (the dense prefix's output to "
            "every stage and its gradient back; its weights, sharded over the stages, gathered and "
            "their gradients reduce-scattered)"
        )
    return cost.step_s + once, cost.bubble_s, cost.p2p_s, hidden, tuple(reasons), outside


def _memory(x: _Inputs) -> tuple[float, tuple[str, ...], bool]:
    """(bytes per device, reasons, whether the closed form supplied them)."""
    report = x.report
    if report.outcome == "oom" and report.oom_required_bytes:
        return float(report.oom_required_bytes), (), False
    if x.native and report.memory is not None and report.memory.peak > 0:
        return float(report.memory.peak), (), False
    return (
        float(x.closed.memory.peak),
        (
            (
                f"memory from the analytic model ({report.target} memory figures are "
                f"not {x.hardware.platform.upper()} figures)"
            ),
        ),
        True,
    )


# Terms that are sums of others or not in HBM: never "the largest term" of a layout that does not fit.
_NOT_TERMS = frozenset({"total", "activations", "layer_phase", "host_offloaded", "runtime_reserve"})


def memory_breakdown(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, hardware: Hardware
) -> dict[str, float]:
    """The closed form's named memory terms per device, plus the runtime reserve the capacity excludes."""
    terms = analytic_memory(cfg, workload, strategy, platform=hardware.platform).to_json()
    return {**terms, "runtime_reserve": float(hardware.memory_reserve_bytes)}


def _largest_terms(terms: dict[str, float], k: int = 3) -> str:
    top = sorted(((v, n) for n, v in terms.items() if n not in _NOT_TERMS and v > 0), reverse=True)[:k]
    return ", ".join(f"{n} {_gb(v)}" for v, n in top)


def estimate_from_report(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, hardware: Hardware, report: CompileReport
) -> Estimate:
    """Price one report: roofline -> collectives -> pipeline bubble -> memory -> reasons."""
    x = _Inputs(cfg, workload, strategy, hardware, report)
    placements = assign_levels(strategy.mesh, hardware)
    reasons = [p.reason for p in placements.values() if p.size > 1]
    compiled = dict(report.mesh)
    if compiled and compiled.get("data", 1) != strategy.size("data"):
        reasons.append(
            f"compiled data={compiled.get('data', 1)} of {strategy.size('data')}; data-axis groups "
            f"scaled to {strategy.size('data')}"
        )

    roof = _roofline(x)
    net = _collectives(x, roof, placements)
    # DualPipe's hidden expert all-to-all is already the overlap model's (expert_comm's dualpipe class):
    # nothing more for the schedule to hide here.
    step, bubble, p2p, a2a_hidden, pipe_reasons, outside = _pipeline(
        x, roof.busy + net.exposed, 0.0, placements
    )
    by_kind, exposed = dict(net.by_kind), net.exposed - a2a_hidden
    if p2p:
        by_kind["collective-permute"] = by_kind.get("collective-permute", 0.0) + p2p
        exposed += p2p
    for kind, seconds in outside.items():  # over pipeline, once per step, exposed
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        exposed += seconds
    mem, mem_reasons, closed_mem = _memory(x)
    cap = hardware.memory_capacity_bytes
    fits = report.outcome != "oom" and mem <= cap
    terms = memory_breakdown(cfg, workload, strategy, hardware)
    evidence = roof.evidence + ("+analytic-memory" if closed_mem and report.target != "analytic" else "")
    reasons += [
        *roof.reasons,
        *net.reasons,
        *pipe_reasons,
        *mem_reasons,
        f"fits: {_gb(mem)} of {_gb(cap)}"
        if fits
        else f"does not fit: {_gb(mem)} > {_gb(cap)}; largest terms (closed form): {_largest_terms(terms)}",
    ]

    tokens = workload.global_batch * workload.seq_len
    model_flops = arithmetic.train_flops_per_token(cfg, workload.seq_len) * tokens
    mfu = model_flops / (step * strategy.n_devices * hardware.peak_flops["bf16"]) if step > 0 else 0.0
    pl = FrozenMap(
        {
            a: FrozenMap({"level": "+".join(pp.levels), "levels": tuple(pp.levels), "reason": pp.reason})
            for a, pp in placements.items()
            if pp.size > 1
        }
    )
    return Estimate(
        strategy=strategy,
        step_time_s=step,
        tokens_per_s=tokens / step if step > 0 else 0.0,
        mfu=mfu,
        memory_per_device_bytes=int(mem),
        memory_capacity_bytes=int(cap),
        fits=fits,
        compute_s=roof.compute_s,
        memory_s=roof.memory_s,
        vector_s=roof.vector_s,
        collective_s=FrozenMap(by_kind),
        exposed_collective_s=exposed,
        pipeline_bubble_s=bubble,
        evidence=evidence,
        reasons=tuple(reasons),
        placements=pl,
        overlap=net.overlap,
        memory_breakdown=FrozenMap(terms),
    )


def estimate_analytic(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, hardware: Hardware
) -> Estimate:
    """The estimate of the closed-form report in the hardware's lowering (the planner's prescreen)."""
    return estimate_from_report(
        cfg,
        workload,
        strategy,
        hardware,
        analytic_report(cfg, workload, strategy, platform=hardware.platform),
    )

"""Pipeline schedule arithmetic: the one place that says what a schedule costs.

Given p pipeline devices, V stage chunks per device, m microbatches and the time of one chunk's
forward (F), full backward (B, including any recompute) and weight-gradient part of B (W), and the
time of one point-to-point transfer of a microbatch's boundary activation, `pipeline_cost` returns
the step, its bubble, the transfers and the microbatches in flight on the busiest (first) stage.
The estimate, the memory model and the planner all ask here; none of them repeats a formula.

Units: times are seconds per step per device. `in_flight` counts one microbatch's saved activations
of ONE device's layers (L/p of them, all V chunks together), the unit `closed_form/memory.py` uses.

Schedules (each formula cited where it is written):
- gpipe: all forwards, then all backwards. Bubble (p - 1)/(V m) of the ideal; every microbatch is in
  flight at the turn (executed: m + (p - 1)/V, the masked ticks' chunks too). V > 1 is MaxText's
  circular pipeline (each device runs its V chunks in turn).
- 1f1b: the same bubble, but the first stage starts backward after its first microbatch's round trip:
  Megatron holds p microbatches, the executed synchronous-tick program min(2p - 1, m).
- interleaved: 1F1B over V chunks per device (Megatron's virtual stages): bubble (p - 1)/(V m), V x
  the transfers; Megatron holds p (1 + (p - 1)/(p V)) microbatches, the executed program
  min(2pV - 1, mV)/V; needs m % p == 0.
- dualpipe: two directions over the same p devices; each device holds stage i and stage p - 1 - i
  (two parameter copies), bubble (p/2 - 1)(F&B + B - 3W), p + 1 in flight; needs p and m even and
  m >= 2p. The expert all-to-all of one direction hides behind the other direction's compute.

Assumption (stated where it is used): Megatron's 1F1B does not split B into input and weight
gradients, so W only enters DualPipe's bubble; the point-to-point transfers of 1F1B-like schedules
sit on the critical path (two per tick: an activation forward, its gradient backward), and DualPipe
is charged the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

from codesign.arithmetic import pipeline_ticks, ring_slots
from codesign.sharding.strategy import PIPELINE_SCHEDULES as SCHEDULES


@dataclass(frozen=True)
class ChunkTimes:
    """Seconds of one stage chunk (L/(p V) layers) for one microbatch, and one transfer."""

    forward: float  # F
    backward: float  # B: input and weight gradients (and recompute) together
    weight_grad: float  # W: the weight-gradient part of B (zero-bubble schedules defer it)
    p2p: float  # one boundary activation (or its gradient) to the neighbouring device


@dataclass(frozen=True)
class PipelineCost:
    schedule: str
    stages: int  # p
    virtual: int  # V
    microbatches: int  # m
    step_s: float
    ideal_s: float  # the device's own compute: every chunk of every microbatch, no idle time
    bubble_s: float  # the busiest device's idle time (warm-up and drain ticks, their transfers included)
    p2p_s: float  # point-to-point transfers on the critical path (those of the bubble's ticks included)
    p2p_transfers: int  # transfers one device sends per step
    in_flight: float  # microbatches' activations (of the device's L/p layers) held on the first stage
    param_copies: int  # copies of a stage's parameters per device (DualPipe: 2)

    @property
    def bubble_fraction(self) -> float:
        """The bubble as a fraction of the step."""
        return self.bubble_s / self.step_s if self.step_s > 0 else 0.0


def schedule_problem(schedule: str, stages: int, virtual: int, microbatches: int, layers: int) -> str | None:
    """Why this schedule cannot run (None when it can). `layers`: the layers one device holds (L/p,
    rounded up), which its V chunks split evenly."""
    p, v, m = stages, virtual, microbatches
    if schedule not in SCHEDULES:
        return f"schedule={schedule!r}; use one of {', '.join(SCHEDULES)}"
    if p <= 1:
        return None
    if layers % v:
        return f"v={v} does not divide the {layers} layers per pipeline stage"
    if schedule == "interleaved" and m % p:
        # Megatron-LM's interleaved schedule asserts microbatches % pipeline size == 0.
        return f"interleaved needs microbatches divisible by pipeline={p} (got {m})"
    if schedule == "dualpipe":
        # deepseek-ai/DualPipe `DualPipe.step`: num_ranks even, num_chunks even and >= 2 * num_ranks.
        if p % 2:
            return f"dualpipe needs an even pipeline (got {p})"
        if m % 2 or m < 2 * p:
            return f"dualpipe needs even microbatches >= 2 x pipeline={2 * p} (got {m})"
    return None


def in_flight_microbatches(schedule: str, stages: int, virtual: int, microbatches: int) -> float:
    """Microbatches' activations (of one device's L/p layers) the first stage holds at its peak, in
    the program `train` executes."""
    p, v, m = stages, virtual, microbatches
    if p <= 1:
        return 1.0
    if schedule == "gpipe":
        # `codesign.pipeline`: the autodiff of the forward tick loop keeps one chunk's residuals for
        # every forward tick, the p - 1 masked ones included.
        return pipeline_ticks(m, p, v) / v
    if schedule in ("1f1b", "interleaved"):
        # `codesign.pipeline_1f1b`: a ring of min(2 p V - 1, M V) chunk forwards. Megatron's 1F1B holds
        # p, its interleaved p (1 + (p - 1)/(p V)) (Korthikanti et al. 2022, sec. 4.2.3): a synchronous
        # tick makes the first stage run p - 1 more forwards before its first backward arrives.
        return ring_slots(m, p, v) / v
    # DeepSeek-V3 technical report (arXiv 2412.19437) Table 2: activation memory PP + 1. Not executed:
    # `train` runs a dualpipe plan as the gpipe program.
    return float(p + 1)


def param_copies(schedule: str) -> int:
    """DeepSeek-V3 report Table 2: DualPipe keeps 2x parameters (stage i and stage p - 1 - i)."""
    return 2 if schedule == "dualpipe" else 1


def overlapped_fraction(schedule: str, stages: int, microbatches: int, kind: str) -> float:
    """The fraction of a collective kind's time that the schedule hides behind other compute.

    DualPipe pairs a forward chunk of one direction with a backward chunk of the other and hides the
    expert all-to-all (dispatch and combine) of each behind the other's compute (DeepSeek-V3 report
    sec. 3.2.1). Only the paired chunks hide it: on the first rank of deepseek-ai/DualPipe's
    `step`, steps 4 and 5 run 2(m/2 - p + 1) + (p/2 - 1) = m - 3p/2 + 1 of its m backward chunks
    paired. Every other schedule runs chunks one at a time: 0.
    """
    if schedule != "dualpipe" or kind != "all-to-all" or microbatches <= 0:
        return 0.0
    p, m = stages, microbatches
    return min(1.0, max(0.0, (m - 1.5 * p + 1) / m))


def chunk_times(stage_s: float, microbatches: int, virtual: int, recompute: float, p2p: float) -> ChunkTimes:
    """Split a device's step work (all m microbatches through its V chunks) into per-chunk F, B, W.

    Assumption: backward runs 2x forward's matmuls, half for input and half for weight gradients
    (W = F), and recomputation adds `recompute` x F to B (1 for a checkpointed layer, 0 without).
    """
    per_chunk = stage_s / (microbatches * virtual)
    forward = per_chunk / (3 + recompute)
    return ChunkTimes(forward, per_chunk - forward, forward, p2p)


def pipeline_cost(
    schedule: str, stages: int, virtual: int, microbatches: int, chunk: ChunkTimes
) -> PipelineCost:
    """Step, bubble and transfers of `schedule` (see the module docstring; `schedule_problem` first)."""
    p, v, m = stages, virtual, microbatches
    f, b, w = chunk.forward, chunk.backward, chunk.weight_grad
    ideal = m * v * (f + b)
    if p <= 1:
        return PipelineCost(schedule, 1, 1, m, ideal, ideal, 0.0, 0.0, 0, 1.0, 1)
    if schedule == "dualpipe":
        # DeepSeek-V3 report Table 2: bubble (PP/2 - 1)(F&B + B - 3W); F&B, a forward and a backward
        # chunk overlapped, takes F + B of compute (the overlap hides communication, not FLOPs). The
        # table's bubble has no transfers; each of the m chunks sends two, as in 1F1B.
        bubble = max(0.0, (p / 2 - 1) * ((f + b) + b - 3 * w))
        p2p = 2 * m * chunk.p2p
        step = ideal + bubble + p2p
    else:
        # GPipe and 1F1B (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2): m + p - 1 ticks of
        # F + B plus two transfers (an activation forward, its gradient backward), p - 1 of them idle:
        # the bubble is (p - 1)/m of the ideal. Interleaved (sec. 2.2.2) runs V m ticks of chunks 1/V
        # the size with the same p - 1 idle ones, (p - 1)/(V m) of the ideal, and V x the transfers.
        tick = f + b + 2 * chunk.p2p
        ticks = m * v + p - 1
        bubble, p2p, step = (p - 1) * tick, 2 * ticks * chunk.p2p, ticks * tick
    return PipelineCost(
        schedule=schedule,
        stages=p,
        virtual=v,
        microbatches=m,
        step_s=step,
        ideal_s=ideal,
        bubble_s=bubble,
        p2p_s=p2p,
        p2p_transfers=2 * m * v,
        in_flight=in_flight_microbatches(schedule, p, v, m),
        param_copies=param_copies(schedule),
    )

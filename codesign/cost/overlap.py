"""How much of each collective hides behind compute: from the compiler's schedule, or a per-kind model.

From the schedule (a TPU/GPU compile whose HLO was read, ``CompileReport.overlap_from_schedule``): each
collective row carries the occurrences XLA issued asynchronously and the compute it scheduled between
their start and done (``Collective.overlap``). That window is timed with the step's own roofline
(:class:`Rates`); the async part of the collective hides up to it, the rest (a synchronous collective,
or one longer than its window) is exposed.

Otherwise (the closed form, a CPU compile standing in for an accelerator, an unreadable HLO) a closed-form
model per kind, each with its assumption (:data:`ASSUMPTIONS`). Per class, the collectives share
``room`` seconds of compute; L = layers per stage, m = microbatches, busy = the step's busy time:

* ``fsdp-gather``: an all-gather over batch axes (FSDP weights), or a collective-permute over them
  (libtpu decomposes large FSDP gathers and gradient scatters into windowed-einsum loops of permutes,
  seen on llama3-8b layers on v5e-8). Layer i+1's weights gather while layer i computes (latency-hiding
  scheduler, TPU async collective fusion); each pass's first gather has nothing before it: at most
  (1 - 1/L) of them hides, within room = busy x (1 - 1/L).
* ``grad-reduce``: a reduce-scatter / all-reduce over batch axes inside the microbatch loop. Layer i's
  gradient reduction runs under layer i-1's backward (backward ~ 2/3 of the step); the last one is
  exposed: at most (1 - 1/L) hides, within room = 2/3 busy x (1 - 1/L).
* ``step-sync``: a collective over the pure data replicas once per step (the accumulated gradients'
  reduction, ZeRO's reduce-scatter and updated-param gather when m > 1 or ZeRO is on; the gather
  spans expert too where ZeRO shards the non-expert params over it). Only the last
  microbatch's backward is left to hide it: room = 2/3 busy / m x (1 - 1/L).
* ``tensor-cm``: an all-gather / reduce-scatter over tensor or sequence with collective matmul
  (windowed einsum) on: decomposed into permutes that run under the matmul they feed, room = the
  matmul kernels' time. Without collective matmul, and for every tensor all-reduce (a Megatron partial
  sum the next op needs), exposed.
* ``dualpipe-a2a``: the expert all-to-all under schedule=dualpipe, which runs one microbatch's forward
  chunk next to another's backward chunk so each one's dispatch and combine run under the other's
  compute (DeepSeek-V3 §3.2.1): room = busy (`codesign.cost.expert_comm`).
* every other all-to-all and collective-permute: exposed (the expert dispatch feeds the experts
  directly; pipeline transfers are costed by the pipeline model).

No more than busy seconds hide in total (every class hides behind the same compute).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from codesign.report import Collective, OverlapWindow

ASSUMPTIONS = {
    "fsdp-gather": "layer i+1's weight gather (or its windowed-einsum permutes) under layer i's compute; "
    "each pass's first gather exposed",
    "grad-reduce": "layer i's gradient reduction under layer i-1's backward (2/3 of busy); the last exposed",
    "step-sync": "once-per-step data reduction/gather under the last microbatch's backward only",
    "tensor-cm": "collective matmul: the tensor all-gather/reduce-scatter under the matmul it feeds",
    "dualpipe-a2a": "DualPipe: one microbatch's expert all-to-all under another's compute",
    "exposed": "the next op needs the result (tensor all-reduce, all-to-all, permute): nothing hides it",
}
BACKWARD_SHARE = 2 / 3  # backward = 2x forward FLOPs


@dataclass(frozen=True)
class Rates:
    """The roofline the step is timed with: matmul FLOP/s (at the step's efficiency), HBM B/s, vector FLOP/s."""

    matmul: float
    hbm: float
    vector: float

    def kernels(self, flops: float, matmul_flops: float, nbytes: float, matmul_bytes: float, trans: float):
        """(matmul kernels, memory-bound kernels' traffic, vector work) seconds, as the step is timed."""
        compute = max(matmul_flops / self.matmul, matmul_bytes / self.hbm)
        memory = max(nbytes - matmul_bytes, 0.0) / self.hbm
        vector = (max(flops - matmul_flops, 0.0) + trans) / self.vector
        return compute, memory, vector

    def window(self, w: OverlapWindow) -> float:
        compute, memory, vector = self.kernels(
            w.flops, w.matmul_flops, w.bytes, w.matmul_bytes, w.transcendentals
        )
        return compute + max(memory, vector)


@dataclass(frozen=True)
class Context:
    """What the per-kind model needs to know about the step."""

    busy_s: float
    matmul_s: float  # the matmul kernels' time (collective matmul hides behind these)
    layers: int  # per pipeline stage
    microbatches: int
    batch_axes: frozenset[str]
    step_sync_axes: frozenset[str]  # pure data replicas reduced once per step (empty: per microbatch)
    collective_matmul: bool
    expert_overlap: bool = False  # the schedule overlaps the expert all-to-all (DualPipe)
    zero_gather_axes: frozenset[str] = frozenset()  # ZeRO: the updated params gathered once per step


def model_class(kind: str, axes: tuple[str, ...], ctx: Context) -> str:
    """The per-kind model's class of one collective (see the module docstring)."""
    ax = set(axes)
    if kind in ("all-gather", "reduce-scatter", "all-reduce", "collective-permute") and ax <= ctx.batch_axes:
        if ctx.step_sync_axes and ax <= ctx.step_sync_axes and kind != "collective-permute":
            return "step-sync"
        if kind == "all-gather" and ax <= ctx.zero_gather_axes:  # ZeRO over expert: data and expert
            return "step-sync"
        return "grad-reduce" if kind in ("reduce-scatter", "all-reduce") else "fsdp-gather"
    if kind in ("all-gather", "reduce-scatter") and ctx.collective_matmul and ax <= {"tensor", "sequence"}:
        return "tensor-cm"
    if kind == "all-to-all" and ax == {"expert"} and ctx.expert_overlap:
        return "dualpipe-a2a"
    return "exposed"


def model_room(cls: str, ctx: Context) -> float:
    first_exposed = 1 - 1 / max(ctx.layers, 1)
    return {
        "fsdp-gather": ctx.busy_s * first_exposed,
        "grad-reduce": BACKWARD_SHARE * ctx.busy_s * first_exposed,
        "step-sync": BACKWARD_SHARE * ctx.busy_s / max(ctx.microbatches, 1) * first_exposed,
        "tensor-cm": ctx.matmul_s,
        "dualpipe-a2a": ctx.busy_s,
    }.get(cls, 0.0)


@dataclass(frozen=True)
class Timed:
    """One collective row of the report, timed on its network levels (all its occurrences)."""

    kind: str
    axes: tuple[str, ...]
    seconds: float
    row: Collective

    @property
    def label(self) -> str:
        return f"{'/'.join(self.axes)} {self.kind}"


@dataclass(frozen=True)
class Hidden:
    """One collective row's time and the part of it hidden, with where that came from."""

    label: str  # "<axes> <kind>"
    seconds: float
    hidden: float
    source: str  # "schedule" or the model's class


def from_schedule(rows: Iterable[Timed], rates: Rates) -> list[Hidden]:
    """The async occurrences hide up to the compute the schedule put between their start and done."""
    out = []
    for r in rows:
        c = r.row
        async_t = r.seconds * (c.async_count / c.count) if c.count else 0.0
        out.append(Hidden(r.label, r.seconds, min(async_t, rates.window(c.overlap)), "schedule"))
    return out


def from_model(rows: Iterable[Timed], ctx: Context) -> list[Hidden]:
    """The per-kind model: each class's collectives share its room in proportion to their time."""
    rows = list(rows)
    classes = [model_class(r.kind, r.axes, ctx) for r in rows]
    want: dict[str, float] = {}
    for cls, r in zip(classes, rows):
        want[cls] = want.get(cls, 0.0) + r.seconds
    per_layer = {"fsdp-gather", "grad-reduce"}  # one per layer per pass: the pass's first/last is exposed
    cap_of = {cls: (1 - 1 / max(ctx.layers, 1)) if cls in per_layer else 1.0 for cls in want}
    share = {cls: min(cap_of[cls], model_room(cls, ctx) / w) if w > 0 else 0.0 for cls, w in want.items()}
    return [Hidden(r.label, r.seconds, r.seconds * share[cls], cls) for cls, r in zip(classes, rows)]


def cap(hidden: list[Hidden], busy_s: float) -> list[Hidden]:
    """Scale the hidden parts down so that no more than `busy_s` hides in total."""
    total = sum(h.hidden for h in hidden)
    if total <= busy_s or total <= 0:
        return hidden
    k = busy_s / total
    return [Hidden(h.label, h.seconds, h.hidden * k, h.source) for h in hidden]

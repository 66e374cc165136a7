"""`CompileReport`: what one compile of one candidate told us, per device, as plain data.

The cost model reads this as data and never calls the compiler. Everything is JSON-round-trippable
so that reports can be cached on disk and shipped back from worker processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OverlapWindow:
    """The compute a scheduled module runs between an async collective's start and its done, per
    device, summed over the collective's occurrences (shared equally where several are in flight):
    what can hide it. The cost model times it with the same roofline as the step."""

    flops: float = 0.0
    matmul_flops: float = 0.0
    bytes: float = 0.0
    matmul_bytes: float = 0.0
    transcendentals: float = 0.0


@dataclass(frozen=True)
class Collective:
    """One kind of collective the step runs, per device.

    ``bytes`` is the buffer each device contributes or receives: for all-gather the OUTPUT (gathered)
    size, for reduce-scatter the INPUT (unscattered) size, for all-reduce, all-to-all and
    collective-permute the buffer size (sum over tuple elements), for send/recv the data buffer.
    ``group_size`` is the devices per replica group (for collective-permute: the largest connected
    set of sources and targets). ``mesh_axes`` are the mesh axes whose coordinate varies inside a group
    (empty when no mesh shape was given). ``count`` is how often it runs per step: identical rows are
    merged and each occurrence contributes the product of its enclosing loops' trip counts.
    ``network`` says which part of the group's network a multi-slice TPU program's collective covers:
    "" the whole group as its mesh axes are placed, "ici" only the part inside one slice, "dcn" only the
    part across slices (libtpu runs a collective over slices as an in-slice one plus a DCN transfer).
    ``async_count`` of those occurrences were issued asynchronously (start and done apart in the
    schedule) and ``overlap`` is the compute scheduled between their starts and dones; both stay zero
    for a synchronous collective and for the closed form, which has no schedule.
    """

    kind: str
    bytes: int
    group_size: int
    mesh_axes: tuple[str, ...]
    count: int
    dtype: str
    async_count: int = 0
    overlap: OverlapWindow = field(default_factory=OverlapWindow)
    network: str = ""


OUTCOMES = ("ok", "oom", "error", "timeout")
# Evidence labels (DESIGN.md): which instrument produced the numbers.
EVIDENCE_BY_TARGET = {
    "cpu": "cpu-compile",
    "tpu": "tpu-aot",
    "gpu": "gpu-aot",
    "attached": "attached-compile",
    "analytic": "analytic",
}


@dataclass(frozen=True)
class MemoryStats:
    """memory_analysis() of the compiled step, bytes per device; capacity is the target device's."""

    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    peak: int = 0  # argument + output - alias + temp: what must fit at once (code is reported apart)
    capacity: int = 0

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CompileReport:
    outcome: str
    target: str
    message: str = ""
    stage: str = ""  # where a failure happened: "build" | "lower" | "compile" | "analyze"
    compile_s: float = 0.0
    mesh: tuple[tuple[str, int], ...] = ()  # the mesh actually compiled (may be reduced, see notes)
    # The candidate's whole mesh; differs from `mesh` for pipeline (one stage compiled) or a reduced
    # data axis (data_scale > 1: compiled data = full data / data_scale, global batch likewise).
    full_mesh: tuple[tuple[str, int], ...] = ()
    pipeline_stages: int = 1
    data_scale: int = 1
    flops: float = 0.0  # per device, loop-aware (dots + elementwise, XLA's convention)
    matmul_flops: float = 0.0
    bytes_accessed: float = 0.0
    matmul_bytes: float = 0.0  # the part of bytes_accessed moved by matmul kernels (hidden under their FLOPs)
    transcendentals: float = 0.0
    xla_cost_analysis: dict[str, Any] | None = None
    collectives: tuple[Collective, ...] = ()
    memory: MemoryStats | None = None
    oom_required_bytes: int = 0
    oom_available_bytes: int = 0
    hlo_bytes: int = 0
    while_loops: tuple[tuple[str, int, str], ...] = ()
    hlo_analyzed: bool = True  # False: compiled, but the HLO text could not be read back (see notes)
    # HLO instructions the walk could not read (never dropped silently: counted, a few named).
    skipped_instructions: int = 0
    skipped_examples: tuple[str, ...] = ()
    # The closed form's instrument: how it lowers collectives ("cpu" | "accelerator"); "" for compilers.
    lowering: str = ""
    # A compile's collective bytes / the closed form's for the same program and lowering (None: not checked).
    closed_form_collective_ratio: float | None = None
    # True when the collectives' async_count/overlap were read from a scheduled TPU/GPU module (the
    # cost model then takes overlap from the schedule, not from its closed-form per-kind model).
    overlap_from_schedule: bool = False
    # The XLA flags the compiler applied (codesign.compile.flags: the target's overlap settings).
    xla_flags: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # e.g. "XLA flops 1/61 of ours: explained by 61-trip loop"
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def evidence(self) -> str:
        return EVIDENCE_BY_TARGET.get(self.target, self.target)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mesh"] = {a: n for a, n in self.mesh}
        d["full_mesh"] = {a: n for a, n in self.full_mesh}
        d["memory"] = self.memory.to_json() if self.memory else None
        d["collectives"] = [dataclasses.asdict(c) for c in self.collectives]
        d["while_loops"] = [list(w) for w in self.while_loops]
        d["notes"] = list(self.notes)
        d["skipped_examples"] = list(self.skipped_examples)
        d["evidence"] = self.evidence
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompileReport:
        d = dict(d)
        d.pop("evidence", None)
        d["mesh"] = tuple((a, int(n)) for a, n in (d.get("mesh") or {}).items())
        d["full_mesh"] = tuple((a, int(n)) for a, n in (d.get("full_mesh") or {}).items())
        d["memory"] = MemoryStats(**d["memory"]) if d.get("memory") else None
        d["collectives"] = tuple(
            Collective(
                **{
                    **c,
                    "mesh_axes": tuple(c["mesh_axes"]),
                    "overlap": OverlapWindow(**(c.get("overlap") or {})),
                }
            )
            for c in d.get("collectives") or ()
        )
        d["while_loops"] = tuple(tuple(w) for w in d.get("while_loops") or ())
        d["notes"] = tuple(d.get("notes") or ())
        d["skipped_examples"] = tuple(d.get("skipped_examples") or ())
        return cls(**d)

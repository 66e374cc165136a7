"""Async collectives in a scheduled HLO computation: which instructions start, carry and end one,
what identifies one across them, and the compute scheduled in its window.

Overlap (a scheduled module prints each computation in execution order): an async collective's
window is the compute of the instructions strictly between its first and last appearance (start,
carrying fusions, done), shared equally among the collectives in flight at each instruction; it is
summed per row in ``Collective.overlap`` with ``async_count``. A collective's start and done in the
same computation is the only pairing read (XLA schedules each computation on its own).

The loop-aware walk (:mod:`codesign.compile.hlo`) counts each instruction and hands the collectives
it starts, carries or ends, with its compute, to a :class:`Schedule`.
"""

from __future__ import annotations

import numpy as np

from codesign.compile import hlo_parse as hp

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
    "send",
    "recv",
)

# Per collective row the walk accumulates a vector: occurrences, occurrences issued asynchronously,
# then the compute scheduled between their start and done (OverlapWindow's fields, in order).
WINDOW_FIELDS = 5


def collective_kind(op: str) -> tuple[str | None, bool]:
    """(base kind, is async start) of a collective opcode; (None, False) for others and -done."""
    if op.endswith("-done"):
        return None, False
    start = op.endswith("-start")
    base = op[: -len("-start")] if start else op
    return (base, start) if base in COLLECTIVES else (None, False)


def ends_async(op: str) -> bool:
    """An op that carries or completes an async collective started earlier in the same computation."""
    if op in ("async-update", "async-done"):
        return True
    return op.endswith("-done") and op[: -len("-done")] in COLLECTIVES


def async_role(ins: hp.Instr, module: hp.Module) -> str | None:
    """ "start" / "done" for an instruction that starts or completes an async collective."""
    op = ins.opcode
    if op == "async-start" or (op.endswith("-start") and op[: -len("-start")] in COLLECTIVES):
        return "start"
    if op != "async-update" and ends_async(op):
        return "done"
    if op == "fusion":  # TPU async collective fusion: the fused root says which end it is
        subs = hp.called(ins.attrs, "calls")
        fused = module.computations.get(subs[0]) if subs else None
        target = (hp.attr(fused.root.attrs, "custom_call_target") or "") if fused and fused.root else ""
        if "AsyncCollectiveStart" in target:
            return "start"
        if "AsyncCollectiveDone" in target:
            return "done"
    return None


class AsyncKeys:
    """Each collective's identity in its computation, shared by the instructions that start, carry
    and end it."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, str], object] = {}  # (computation, instruction) -> collective key

    def key(self, comp: hp.Computation, ins: hp.Instr, channel: int | None) -> object:
        """A collective's identity in its computation: its channel id (shared by the start, continuation
        and done fusions of one TPU async collective) or else the instruction that starts it."""
        key = ("channel", channel) if channel is not None else ("instr", ins.name)
        self.started[(comp.name, ins.name)] = key
        return key

    def started_by(self, comp: hp.Computation, name: str) -> object:
        """The collective that instruction `name` (an async start, or an update carrying one) began."""
        while (ins := comp.by_name.get(name)) is not None and ins.opcode == "async-update" and ins.operands:
            name = ins.operands[0]
        return self.started.get((comp.name, name), ("instr", name))


class Schedule:
    """A computation that runs (not fused), in its printed order, which is XLA's schedule
    (``is_scheduled=true``). Each collective is a key seen at one or more positions: a synchronous
    one at one, an async one at its start, its done and (TPU async collective fusion) the compute
    fusions that carry it forward in between. The compute at the positions strictly inside a
    collective's span is its window, shared equally by every collective in flight there. A loop
    body whose collective is done before it is started (issued for the next iteration) wraps: its
    window is the rest of the body after the start and the body's beginning up to the done."""

    def __init__(self) -> None:
        self.spans: dict[object, list[int]] = {}
        self.rows: dict[object, list[tuple]] = {}
        self.work: list[np.ndarray] = []
        self.roles: list[str | None] = []

    def add(self, events: list[tuple[object, tuple | None]], work: np.ndarray, role: str | None) -> None:
        """The next instruction: the collectives it starts, carries or ends as (key, row or None),
        its compute (in the window layout) and its :func:`async_role`."""
        i = len(self.work)
        for key, row in events:
            pos = self.spans.setdefault(key, [])
            if row is not None and not pos:  # counted once, where it first appears
                self.rows.setdefault(key, []).append(row)
            if not pos or pos[-1] != i:
                pos.append(i)
        self.work.append(work)
        self.roles.append(role)

    def row_vectors(self) -> list[tuple[tuple, np.ndarray]]:
        """Per collective row: (occurrences, async occurrences, window compute...), in first-seen order."""
        spans, work, roles = self.spans, self.work, self.roles
        n = len(work)
        inside: dict[object, list[int]] = {}
        for key, pos in spans.items():
            first, last = pos[0], pos[-1]
            if roles[first] == "done" and roles[last] == "start":
                inside[key] = list(range(last + 1, n)) + list(range(first))
            else:
                inside[key] = list(range(first + 1, last))
        ends = {p for pos in spans.values() for p in (pos[0], pos[-1])}
        in_flight: dict[int, int] = {}
        for idx in inside.values():
            for i in idx:
                in_flight[i] = in_flight.get(i, 0) + 1
        out = []
        for key, key_rows in self.rows.items():
            window = sum(
                (work[i] / in_flight[i] for i in inside[key] if i not in ends), np.zeros(WINDOW_FIELDS)
            )
            is_async = 1.0 if len(spans[key]) > 1 else 0.0
            for row in key_rows:
                out.append((row, np.concatenate(([1.0, is_async], window / len(key_rows)))))
        return out

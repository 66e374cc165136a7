"""Loop-aware walk of a compiled HLO module: per-device FLOPs, bytes and collectives per step.

XLA's ``compiled.cost_analysis()`` counts a ``while`` body once (so a scanned 80-layer model reports
~1/80 of its FLOPs). This walk multiplies every computation by the trip counts of the loops that
enclose it. Trip counts come from ``backend_config={"known_trip_count":{"n":..}}`` (CPU/GPU) or,
when that is absent (TPU), from the loop condition ``compare(get-tuple-element(param), constant(N))``
with the induction variable's initial value read from the while operand's tuple.

Counting rules (all per device, per execution of ENTRY):

* FLOPs: ``dot`` = 2 x output elements x product of lhs contracting dims; ``convolution`` = 2 x output
  elements x (kernel elements / output features); cuBLAS/cuDNN-style gemm custom-calls like dot;
  cuDNN flash attention (``__cudnn$fmha*``) 4 x B x N x T x S x H forward and 2.5x that backward (5
  matmuls to 2: the backward recomputes the scores), with a causal mask only the tiles cuDNN computes
  (`models.attention.flash_flops`: 128 x 128 tiles assumed, about half). Pallas TPU splash attention (``tpu_custom_call`` ``splash_mha_*``): its causal tiles from the
  q/k/v operand shapes and the block sizes in its metadata (`hlo_flops.splash_flops`). All of these count as
  matmul FLOPs; a kernel's bytes are its operands and results, like any top-level instruction.
  Elementwise ops 1 per output element, ``reduce`` 1 per input element, ``reduce-window`` 1 per output
  element per window element. Transcendental ops count in ``transcendentals`` only (as HloCostAnalysis).
  Ops inside fusion computations count (a dot inside a fusion is a dot).
* Bytes: each top-level instruction of each computation that runs, fusions as one op (operands +
  output). Fusion operands only read through (dynamic-)slices count the slice size (TPU's async
  ``slice-start`` likewise: read and write of the slice, its ``-done`` nothing), and in-place
  dynamic-update-slice outputs count the update size, as XLA does. Parameter, constant, tuple,
  get-tuple-element, bitcast and control-flow wrappers count nothing. ``matmul_bytes`` is the part
  moved by top-level ops that contain a matmul (their operand traffic runs under their FLOPs; the rest
  is memory-bound kernels, which the cost model times separately).
* Collectives (see :class:`Collective`): async ``-start``/``-done`` pairs count once; collectives
  inside fusions count (TPU wraps reduce-scatter as a fusion of all-reduce + dynamic-slice, which is
  reported as ``reduce-scatter``). A multi-slice TPU program's cross-slice part is a megascale
  host-transfer ``send``/``recv`` pair (:mod:`codesign.compile.megascale`): the ``send`` counts as the
  collective it implements, over the mesh axes its device groups vary along (``device_ids``).
  One collective that appears in several fusions of a computation
  with the same ``channel_id`` counts once: TPU's async collective fusion prints the all-gather in
  its start fusion, in every compute fusion that carries it forward, and in its done fusion.
* Overlap: an async collective's window, the compute scheduled between its start and done, is
  read from the module's schedule by :mod:`codesign.compile.hlo_overlap`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codesign.compile import hlo_flops as hf
from codesign.compile import hlo_overlap as ov
from codesign.compile import hlo_parse as hp
from codesign.compile import megascale
from codesign.report import Collective, OverlapWindow

_TRANSCENDENTAL = frozenset(
    {
        "exponential",
        "exp",
        "log",
        "tanh",
        "logistic",
        "rsqrt",
        "sqrt",
        "cbrt",
        "power",
        "sine",
        "cosine",
        "tan",
        "erf",
        "exponential-minus-one",
        "log-plus-one",
        "atan2",
    }
)
_ELEMENTWISE = frozenset(
    {
        "add",
        "subtract",
        "multiply",
        "divide",
        "maximum",
        "minimum",
        "remainder",
        "compare",
        "select",
        "clamp",
        "and",
        "or",
        "xor",
        "not",
        "negate",
        "abs",
        "sign",
        "floor",
        "ceil",
        "round-nearest-afz",
        "round-nearest-even",
        "is-finite",
        "shift-left",
        "shift-right-logical",
        "shift-right-arithmetic",
        "popcnt",
        "count-leading-zeros",
        "real",
        "imag",
        "complex",
        "stochastic-convert",
    }
)
_NO_BYTES = frozenset(
    {
        "parameter",
        "constant",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "while",
        "call",
        "conditional",
        "async-start",
        "async-update",
        "async-done",
        "after-all",
        "partition-id",
        "replica-id",
        "add-dependency",
        "opt-barrier",
        "domain",
        "copy-done",
        "send-done",
        "recv-done",
        "slice-done",
    }
)


@dataclass(frozen=True)
class HloStats:
    flops: float
    matmul_flops: float
    transcendentals: float
    bytes_accessed: float
    collectives: tuple[Collective, ...]
    while_loops: tuple[tuple[str, int, str], ...]  # (while instruction name, trip count, source)
    hlo_bytes: int
    skipped_lines: int = 0  # instruction lines the parser could not read (counted, never raised)
    matmul_bytes: float = 0.0  # the part of bytes_accessed moved by ops that contain a matmul
    # Instructions parsed but not understood by the walk ("opcode name: error"), each one left uncounted.
    skipped_instructions: tuple[str, ...] = ()
    scheduled: bool = False  # the module is scheduled: collectives' async_count/overlap are its schedule's

    @property
    def skipped(self) -> int:
        """Everything the walk could not count: unparsed lines and unreadable instructions."""
        return self.skipped_lines + len(self.skipped_instructions)

    def report_counts(self) -> dict:
        """The `CompileReport` fields this walk counts (what a report re-read from saved HLO replaces)."""
        return {
            "flops": self.flops,
            "matmul_flops": self.matmul_flops,
            "bytes_accessed": self.bytes_accessed,
            "matmul_bytes": self.matmul_bytes,
            "transcendentals": self.transcendentals,
            "collectives": self.collectives,
        }


class _Acc:
    __slots__ = ("bytes", "coll", "flops", "fused_coll", "mm", "mm_bytes", "trans")

    def __init__(self) -> None:
        self.flops = self.mm = self.trans = self.bytes = self.mm_bytes = 0.0
        self.coll: dict[tuple, np.ndarray] = {}
        # Collectives inside a fused computation, (channel id or None, row): the fusion's caller decides
        # whether each one is new or a continuation of an async collective fusion it has already seen.
        self.fused_coll: list[tuple[int | None, tuple]] = []

    def add(self, other: _Acc, k: float = 1.0, coll: bool = True) -> None:
        self.flops += other.flops * k
        self.mm += other.mm * k
        self.trans += other.trans * k
        self.bytes += other.bytes * k
        self.mm_bytes += other.mm_bytes * k
        if coll:
            for key, c in other.coll.items():
                self.coll[key] = self.coll.get(key, 0.0) + c * k

    def work(self) -> np.ndarray:
        """The compute this accumulates, in the window layout of a collective row (`hlo_overlap`)."""
        return np.array([self.flops, self.mm, self.bytes, self.mm_bytes, self.trans])


def _compute(ins: hp.Instr, comp: hp.Computation, acc: _Acc) -> None:
    op = ins.opcode
    f = hf.matmul_flops(ins, comp)
    if f:
        acc.flops += f
        acc.mm += f
    elif op in _TRANSCENDENTAL:
        acc.trans += hf.elems(ins.shape)
    elif op in _ELEMENTWISE:
        acc.flops += hf.elems(ins.shape)
    elif op == "reduce" and ins.operands:
        n_in = max(1, len(ins.operands) // 2)
        acc.flops += hf.elems(hf.operand_shape(comp, ins.operands[0])) * n_in
    elif op == "reduce-window":
        size = hp.int_list((re.search(r"size=([\dx]+)", ins.attrs) or [None, ""])[1].replace("x", ","))
        acc.flops += hf.elems(ins.shape) * math.prod(size or [1])


def _operand_bytes(ins: hp.Instr, comp: hp.Computation) -> float:
    return sum(hp.shape_bytes(hf.operand_shape(comp, o)) for o in ins.operands)


def _fusion_bytes(ins: hp.Instr, comp: hp.Computation, fused: hp.Computation | None) -> float:
    if fused is None:
        return _operand_bytes(ins, comp) + hp.shape_bytes(ins.shape)
    params = {}
    for f in fused.instrs:
        if f.opcode == "parameter":
            idx = hp.int_list(f.operand_text)
            if idx:
                params[idx[0]] = f
    total = 0.0
    for i, o in enumerate(ins.operands):
        full = hp.shape_bytes(hf.operand_shape(comp, o))
        p = params.get(i)
        users = fused.users(p.name) if p else []
        if users and all(
            u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == p.name for u in users
        ):
            total += min(full, sum(hp.shape_bytes(u.shape) for u in users))
        elif users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == p.name for u in users):
            pass  # updated in place: only the update is written (counted with the output)
        else:
            total += full
    roots = [fused.root] if fused.root is not None else []
    if roots and roots[0].opcode == "tuple":
        roots = [fused.by_name.get(n) for n in roots[0].operands]
    out = 0.0
    for r in roots:
        if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            out += hp.shape_bytes(hf.operand_shape(fused, r.operands[1]))
        elif r is not None:
            out += hp.shape_bytes(r.shape)
    return total + (out if roots else hp.shape_bytes(ins.shape))


class _Walker:
    def __init__(
        self,
        module: hp.Module,
        mesh_shape: Sequence[tuple[str, int]] | None,
        device_ids: Sequence[int] | None = None,
        multislice: bool = False,
    ):
        self.m = module
        self.multislice = multislice
        self.position = {int(d): i for i, d in enumerate(device_ids or ())}  # device id -> mesh index
        self.axes = [a for a, _ in mesh_shape] if mesh_shape else []
        self.sizes = [int(s) for _, s in mesh_shape] if mesh_shape else []
        n_mesh = math.prod(self.sizes) if self.sizes else None
        self.n_devices = module.num_partitions or n_mesh
        self.memo: dict[tuple[str, bool], _Acc] = {}
        self.loops: dict[str, tuple[str, int, str]] = {}
        self.active: set[str] = set()
        self.skipped: list[str] = []
        self.keys = ov.AsyncKeys()  # each collective's identity across its start, carries and done

    # -- collectives ------------------------------------------------------------------------
    def _axes_of(self, groups: list[list[int]]) -> tuple[str, ...]:
        if not self.sizes:
            return ()
        n = math.prod(self.sizes)
        varying = set()
        for g in groups:
            ids = [i for i in g if 0 <= i < n]
            if len(ids) < 2:
                continue
            coords = np.array(np.unravel_index(ids, self.sizes))
            varying.update(int(d) for d in np.nonzero((coords != coords[:, :1]).any(axis=1))[0])
        return tuple(self.axes[d] for d in sorted(varying))

    def _collective(self, ins: hp.Instr, comp: hp.Computation, kind: str, start: bool) -> tuple:
        in_bytes = _operand_bytes(ins, comp)
        if kind == "send" and megascale.is_megascale(ins.attrs):  # the DCN half of a cross-slice collective
            ids = megascale.target_groups(ins.attrs)
            groups = [[self.position[d] for d in g if d in self.position] for g in ids]
            dtype = hp.first_dtype(hf.operand_shape(comp, ins.operands[0]) if ins.operands else ins.shape)
            size = max((len(g) for g in ids), default=1)
            return (
                megascale.transfer_kind(ins.attrs) or kind,
                int(in_bytes),
                size,
                self._axes_of(groups),
                dtype,
                "dcn",
            )
        if kind == "collective-permute":
            pairs = hp.source_target_pairs(ins.attrs)
            group_size, groups = _largest_component(pairs), [list(p) for p in pairs]
        else:
            groups = hp.replica_groups(ins.attrs, self.n_devices) or []
            group_size = max((len(g) for g in groups), default=self.n_devices or 1)
        if kind == "all-gather":
            nbytes = in_bytes * group_size if start else hp.shape_bytes(ins.shape)
        elif kind == "recv":
            arrays = hp.array_shapes(ins.shape)
            nbytes = hp.dtype_bytes(arrays[0][0]) * math.prod(arrays[0][1]) if arrays else 0
        elif kind in ("reduce-scatter", "send") or start:
            nbytes = in_bytes
        else:
            nbytes = hp.shape_bytes(ins.shape)
        dtype = hp.first_dtype(hf.operand_shape(comp, ins.operands[0]) if ins.operands else ins.shape)
        dtype = dtype or hp.first_dtype(ins.shape)
        # In a multi-slice program every other collective stays inside a slice.
        network = "ici" if self.multislice else ""
        return kind, int(nbytes), int(group_size), self._axes_of(groups), dtype, network

    # -- the walk ------------------------------------------------------------------------------
    def walk(self, name: str, fused: bool) -> _Acc:
        key = (name, fused)
        if key in self.memo:
            return self.memo[key]
        acc = _Acc()
        comp = self.m.computations.get(name)
        if comp is None or name in self.active:
            return acc
        self.active.add(name)
        if fused:
            for ins in comp.instrs:
                self._guarded(ins, comp, True, acc)
        else:
            self._walk_scheduled(comp, acc)
        self.active.discard(name)
        self.memo[key] = acc
        return acc

    def _guarded(self, ins: hp.Instr, comp: hp.Computation, fused: bool, acc: _Acc) -> list:
        try:
            return self._instr(ins, comp, fused, acc)
        except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError) as e:
            # Counted and named, never silent: a parser gap would otherwise quietly lower FLOPs.
            self.skipped.append(f"{ins.opcode} {ins.name}: {type(e).__name__}")
            return []

    def _walk_scheduled(self, comp: hp.Computation, acc: _Acc) -> None:
        """A computation that runs (not fused), in its printed order, which is XLA's schedule: each
        instruction counted, its collectives' overlap windows read from that order (`hlo_overlap`)."""
        schedule = ov.Schedule()
        for ins in comp.instrs:
            ia = _Acc()
            events = self._guarded(ins, comp, False, ia)
            acc.add(ia)
            schedule.add(events, ia.work(), ov.async_role(ins, self.m))
        for row, vec in schedule.row_vectors():
            acc.coll[row] = acc.coll.get(row, 0.0) + vec

    def _instr(self, ins: hp.Instr, comp: hp.Computation, fused: bool, acc: _Acc) -> list:
        """Count one instruction into `acc`; return the collectives it starts, carries or ends at this
        level as (key, row or None) (fused: nothing, they go to ``acc.fused_coll``)."""
        op = ins.opcode
        events: list[tuple[object, tuple | None]] = []
        kind, start = ov.collective_kind(op)
        if kind == "recv" and megascale.is_megascale(ins.attrs):
            kind = None  # the receiving half of a cross-slice collective its send already counts
        if kind is not None:
            row = self._collective(ins, comp, kind, start)
            if kind == "all-reduce" and fused and _is_scatter_fusion(comp, ins):
                row = ("reduce-scatter",) + row[1:]
            if fused:
                acc.fused_coll.append((_channel(ins), row))
            else:
                # A top-level collective is its own instruction: XLA may give many the same channel id
                # (XLA:CPU numbers every reduce-scatter of a shard_map region channel_id=1), and only a
                # fused chain's start/carry/done share one collective.
                events.append((self.keys.key(comp, ins, None), row))
        elif ov.ends_async(op) and ins.operands and not fused:
            events.append((self.keys.started_by(comp, ins.operands[0]), None))
        if op == "while":
            n, source = hp.loop_trip_count(ins, comp, self.m)
            self.loops.setdefault(ins.name, (ins.name, n, source))
            for c in hp.called(ins.attrs, "body") + hp.called(ins.attrs, "condition"):
                acc.add(self.walk(c, False), n)
            return events
        if op == "fusion":
            subs = hp.called(ins.attrs, "calls")
            mm_before = acc.mm
            for c in subs:
                sub = self.walk(c, True)
                acc.add(sub)
                if fused:
                    acc.fused_coll.extend(sub.fused_coll)
                else:
                    events += [(self.keys.key(comp, ins, ch), row) for ch, row in sub.fused_coll]
            if not fused:
                nbytes = _fusion_bytes(ins, comp, self.m.computations.get(subs[0]) if subs else None)
                acc.bytes += nbytes
                if acc.mm > mm_before:
                    acc.mm_bytes += nbytes
            return events
        if op in ("call", "async-start"):
            for c in hp.called(ins.attrs, "to_apply") + hp.called(ins.attrs, "calls"):
                if op == "async-start" and not fused:  # the wrapped op is one async collective here
                    acc.add(self.walk(c, False), coll=False)
                    events += [
                        (self.keys.key(comp, ins, ch), row) for ch, row in self.walk(c, True).fused_coll
                    ]
                else:
                    acc.add(self.walk(c, fused))
            return events
        if op == "conditional":
            names = (
                hp.called(ins.attrs, "branch_computations")
                + hp.called(ins.attrs, "true_computation")
                + hp.called(ins.attrs, "false_computation")
            )
            branches = [self.walk(c, fused) for c in names]
            if branches:  # the costliest branch: an upper bound on one execution
                acc.add(max(branches, key=lambda b: (b.flops, b.bytes)))
            return events
        mm_before = acc.mm
        _compute(ins, comp, acc)
        if fused or op in _NO_BYTES:
            return events
        bytes_before = acc.bytes
        if kind is not None and start:
            acc.bytes += _operand_bytes(ins, comp) + row[1]
        elif op == "copy-start":
            acc.bytes += 2 * _operand_bytes(ins, comp)
        elif op == "dynamic-slice":
            acc.bytes += 2 * hp.shape_bytes(ins.shape)
        elif op == "slice-start":  # TPU async slice: ((operand), slice, context); it moves the slice only
            shapes = hp.array_shapes(ins.shape)
            if len(shapes) > len(ins.operands):
                dtype, dims = shapes[len(ins.operands)]
                acc.bytes += 2 * hp.dtype_bytes(dtype) * math.prod(dims)
        elif op == "dynamic-update-slice" and len(ins.operands) > 1:
            acc.bytes += 2 * hp.shape_bytes(hf.operand_shape(comp, ins.operands[1]))
        else:
            acc.bytes += _operand_bytes(ins, comp) + hp.shape_bytes(ins.shape)
        if acc.mm > mm_before:
            acc.mm_bytes += acc.bytes - bytes_before
        return events


def _channel(ins: hp.Instr) -> int | None:
    v = hp.int_list(hp.attr(ins.attrs, "channel_id"))
    return v[0] if v else None


def _largest_component(pairs: list[tuple[int, int]]) -> int:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    sizes: dict[int, int] = {}
    for x in list(parent):
        r = find(x)
        sizes[r] = sizes.get(r, 0) + 1
    return max(sizes.values(), default=1)


def _is_scatter_fusion(comp: hp.Computation, ins: hp.Instr) -> bool:
    root = comp.root
    return (
        root is not None
        and root.opcode == "dynamic-slice"
        and bool(root.operands)
        and root.operands[0] == ins.name
    )


def analyze_hlo(
    hlo_text: str,
    mesh_shape: Sequence[tuple[str, int]] | None = None,
    device_ids: Sequence[int] | None = None,
    multislice: bool = False,
) -> HloStats:
    """Loop-aware per-device statistics of a post-optimization HLO module (``compiled.as_text()``).

    ``mesh_shape`` is the mesh as ``[(axis name, size), ...]`` in mesh order; partition ids in replica
    groups are row-major indices into it. ``device_ids``: the mesh's device ids in that order (what
    multi-slice megascale transfers name); ``multislice``: the program runs on several TPU slices, so its
    ordinary collectives cover only the in-slice part of their groups (``Collective.network``). Never
    raises on malformed text: it returns what it could read.
    """
    text = hlo_text if isinstance(hlo_text, str) else ""
    try:
        module = hp.parse_module(text)
    except Exception:  # noqa: BLE001 - robustness is the contract: malformed text → empty stats
        module = hp.Module({}, None, None, len(text.splitlines()))
    walker = _Walker(module, list(mesh_shape) if mesh_shape else None, device_ids, multislice)
    acc = walker.walk(module.entry, False) if module.entry else _Acc()
    collectives = tuple(
        Collective(
            kind=k,
            bytes=b,
            group_size=g,
            mesh_axes=axes,
            count=round(v[0]),
            dtype=dt,
            network=net,
            async_count=round(v[1]),
            overlap=OverlapWindow(*(float(x) for x in v[2:])),
        )
        for (k, b, g, axes, dt, net), v in acc.coll.items()
    )
    return HloStats(
        flops=acc.flops,
        matmul_flops=acc.mm,
        transcendentals=acc.trans,
        bytes_accessed=acc.bytes,
        collectives=collectives,
        while_loops=tuple(walker.loops.values()),
        hlo_bytes=len(text.encode()),
        skipped_lines=module.skipped_lines,
        matmul_bytes=acc.mm_bytes,
        skipped_instructions=tuple(walker.skipped),
        scheduled=module.scheduled,
    )

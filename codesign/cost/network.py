"""Which network level each mesh axis rides, and what a collective over some mesh axes costs.

Mesh axes are given OUTERMOST FIRST and devices are numbered row-major over the mesh, so the last axis
varies fastest and lands on adjacent devices. Levels are contiguous blocks of device ids: an 8-GPU
NVLink node is ids 0-7, 8-15, ...; a TPU slice is one block whose chips are numbered x fastest, then
y, then z. Walking the axes from the innermost outward therefore fills the fastest level first. An axis
whose span crosses a level boundary is hierarchical: part of it inside (inner group size), the rest
across (outer group count). On a TPU torus an axis takes torus dims in x, y, z order - one or several,
or part of one - and rides the wraparound only when it closes the ring on that dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from codesign.cost.collectives import Span, collective_time, merge_spans
from codesign.hardware.catalog import Hardware, HardwareError, NetworkLevel

_DOMAIN = {"nvlink": ("node", "nodes"), "ici": ("slice", "slices"), "host": ("host", "hosts")}


@dataclass(frozen=True)
class AxisPlacement:
    axis: str
    size: int
    spans: tuple[Span, ...]  # innermost level first; more than one when the axis is hierarchical
    level_indices: tuple[int, ...]  # each span's index in Hardware.levels
    stride: int  # device-id distance between neighbours along this axis (product of the inner axes)
    reason: str
    collective_efficiency: float = 1.0  # the hardware's, so callers need not carry it

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(s.level.name for s in self.spans)

    @property
    def hierarchical(self) -> bool:
        return len(self.spans) > 1

    @property
    def inner_group_size(self) -> int:
        """Devices of this axis inside the innermost level it touches."""
        return self.spans[0].size if self.spans else 1

    @property
    def outer_group_count(self) -> int:
        return self.size // self.inner_group_size

    def to_json(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "size": self.size,
            "levels": list(self.levels),
            "stride": self.stride,
            "hierarchical": self.hierarchical,
            "inner_group_size": self.inner_group_size,
            "outer_group_count": self.outer_group_count,
            "reason": self.reason,
            "spans": [
                {
                    "level": s.level.name,
                    "size": s.size,
                    "torus_dims": list(s.dims),
                    "wraps": list(s.wraps),
                    "strides": list(s.strides),
                }
                for s in self.spans
            ],
        }


def _unit(hw: Hardware) -> str:
    return {"gpu": "GPUs", "tpu": "chips"}.get(hw.platform, "devices")


def _domain(level: NetworkLevel) -> tuple[str, str]:
    if level.name == "nvlink" and level.max_group_size > 8:
        return "NVLink domain", "NVLink domains"
    return _DOMAIN.get(level.name, (f"{level.name} group", f"{level.name} groups"))


def _torus_span(level: NetworkLevel, lo: int, hi: int) -> Span | None:
    """The span of stride range [lo, hi) (in chips, within one slice) over the level's torus dims;
    None when it does not split evenly into dims."""
    if not level.torus_dims:
        return Span(level, hi // lo)
    dims, wraps, strides = [], [], []
    p = 1
    for d, wrap in zip(level.torus_dims, level.wraps):
        q_lo, q_hi = min(max(lo, p), p * d), min(max(hi, p), p * d)
        if q_hi > q_lo:
            if q_hi % q_lo:
                return None
            dims.append(q_hi // q_lo)
            strides.append(q_lo // p)
            wraps.append(wrap and q_hi == p * d)  # the ring closes only through the dim's wraparound
        p *= d
    if math.prod(dims) != hi // lo:
        return None
    return Span(level, hi // lo, tuple(dims), tuple(wraps), tuple(strides))


def _torus_words(span: Span) -> str:
    parts = [(d, w, s) for d, w, s in zip(span.dims, span.wraps, span.strides) if d > 1]
    shape = "x".join(str(d) for d, _, _ in parts)
    nwrap = sum(w for _, w, _ in parts)
    wrap = (
        "no wraparound"
        if nwrap == 0
        else "wraparound"
        if len(parts) == 1
        else "wraparound on all"
        if nwrap == len(parts)
        else f"wraparound on {nwrap} of {len(parts)}"
    )
    apart = max((s for _, _, s in parts), default=1)
    spaced = f", members up to {apart} chips apart" if apart > 1 else ""
    return f"torus dim{'s' if len(parts) > 1 else ''} {shape} ({wrap}{spaced})"


def _reason(name: str, size: int, spans: list[Span], idx: list[int], hw: Hardware, note: str) -> str:
    if not spans:
        return f"{name}={size}: no communication"
    levels = hw.levels
    if len(spans) > 1:
        parts = " x ".join(
            f"{s.size} {'on' if i == 0 else 'across'} {s.level.name}" for i, s in enumerate(spans)
        )
        return f"{name}={size} spans levels: {parts} (hierarchical){note}"
    s, k = spans[0], idx[0]
    if s.level.topology == "torus":
        return f"{name}={size} rides {s.level.name} on {_torus_words(s)}{note}"
    if k == 0:
        lv = levels[0]
        if len(levels) == 1:
            return f"{name}={size} rides {lv.name}{note}"
        return f"{name}={size} rides {lv.name} ({lv.group_size} {_unit(hw)} per {_domain(lv)[0]}){note}"
    return f"{name}={size} spans {_domain(levels[k - 1])[1]}: rides {s.level.name}{note}"


def assign_levels(mesh_axes: Sequence[tuple[str, int]], hardware: Hardware) -> dict[str, AxisPlacement]:
    """Place each mesh axis (outermost first) on the network levels it spans.

    The hardware is sized for the mesh's device count first (`Hardware.with_devices`), so a catalog
    entry without a device count works, and a TPU mesh gets its slice's torus dims.
    """
    names = [n for n, _ in mesh_axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names must be unique, got {names}")
    for n, size in mesh_axes:
        if int(size) < 1:
            raise ValueError(f"mesh axis {n!r} has size {size}; sizes must be >= 1")
    total = math.prod(int(s) for _, s in mesh_axes)
    hw = hardware if hardware.devices == total else hardware.with_devices(total)
    if total > 1 and not hw.levels:
        raise HardwareError(f"{hw.name} has no network levels to place {total} devices on")
    # Level k holds contiguous blocks of bounds[k + 1] devices; the outermost level holds them all.
    bounds = [1]
    for k, lv in enumerate(hw.levels):
        g = total if k == len(hw.levels) - 1 else (lv.group_size or total)
        bounds.append(max(min(g, total), bounds[-1]))

    out: dict[str, AxisPlacement] = {}
    stride = 1
    for name, size in reversed(list(mesh_axes)):
        size = int(size)
        lo, hi = stride, stride * size
        spans: list[Span] = []
        idx: list[int] = []
        note = ""
        for k, lv in enumerate(hw.levels):
            a, b = bounds[k], bounds[k + 1]
            p_lo, p_hi = min(max(lo, a), b), min(max(hi, a), b)
            if p_hi <= p_lo:  # the axis does not reach this level
                continue
            span = None
            if p_hi % p_lo == 0 and p_lo % a == 0:
                span = (
                    _torus_span(lv, p_lo // a, p_hi // a)
                    if lv.topology == "torus"
                    else Span(lv, p_hi // p_lo)
                )
            if span is None:  # does not split evenly: charge the whole axis to the slowest level it touches
                last = max(k2 for k2 in range(len(hw.levels)) if bounds[k2] < hi)
                spans, idx = [Span(hw.levels[last], size)], [last]
                note = (
                    f" (does not split evenly at the {lv.name} boundary; charged to {hw.levels[last].name})"
                )
                break
            spans.append(span)
            idx.append(k)
        out[name] = AxisPlacement(
            name,
            size,
            tuple(spans),
            tuple(idx),
            stride,
            _reason(name, size, spans, idx, hw, note),
            hw.efficiency.collective,
        )
        stride = hi
    return {n: out[n] for n in names}


def collective_time_on_axes(
    kind: str,
    bytes_per_device: float,
    axes: Sequence[str],
    placements: Mapping[str, AxisPlacement],
    efficiency: float | None = None,
    network: str = "",
) -> float:
    """Seconds for one collective whose group is the product of `axes` (see codesign.cost.collectives for
    the bytes convention). Spans of the axes are merged per level; a group that crosses levels is costed
    hierarchically. efficiency defaults to the hardware's collective efficiency. network (a compiled
    multi-slice collective's `Collective.network`): "ici" times only the innermost level's part of the
    group, "dcn" only the parts beyond it; "" the whole group."""
    missing = [a for a in axes if a not in placements]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the placements {list(placements)}")
    chosen = [placements[a] for a in axes]
    order: dict[int, NetworkLevel] = {}
    for p in chosen:
        for i, s in zip(p.level_indices, p.spans):
            order.setdefault(i, s.level)
    spans = merge_spans([p.spans for p in chosen], [order[i] for i in sorted(order)])
    if network and len(spans) > 1:
        spans = spans[:1] if network == "ici" else spans[1:]
    if efficiency is None:
        efficiency = min((p.collective_efficiency for p in chosen), default=1.0)
    return collective_time(kind, bytes_per_device, spans, efficiency)

"""Alpha-beta cost of ONE collective on the network levels its group spans. Pure functions, seconds.

Size convention: `bytes_per_device` is the buffer that is whole on every device -
- all-gather: what each device holds at the END (the gathered buffer; each starts with 1/n of it);
- reduce-scatter: what each device holds at the START (it ends with 1/n of it, reduced);
- all-reduce: the buffer (same at start and end);
- all-to-all: what each device holds (the same before and after; it keeps 1/n, sends (n-1)/n);
- collective-permute / send-recv: what each device sends.

A group is one `Span` per network level it touches, innermost first (an 8-GPU NVLink node, then the
nodes over InfiniBand). Each span of a group of n devices is one of:
- switch (NVLink/NVSwitch, IB, DCN): every device drives its own `bytes_per_s` in each direction.
  all-gather / reduce-scatter: ring, (n-1)/n*B/bw + (n-1)*alpha.
  all-reduce: the fastest of ring (twice the above), recursive halving-doubling (power-of-two n:
  2(n-1)/n*B/bw + 2*log2(n)*alpha) and a double binary tree (NCCL's: 2*B/bw + 2*ceil(log2 n)*alpha).
  all-to-all: (n-1)/n*B/bw + alpha (every pair exchanges at once).
- torus (TPU ICI), the group taking one or more torus dims, each with a link of one-way bandwidth w:
  all-gather / reduce-scatter: (n-1)/n*B / sum_i(w_i) - the scaling book's "bandwidth scales with the
  number of axes" - where w_i is w on a dim without wraparound and 2w (both ring directions) on one with
  it; alpha per hop, d_i/2 hops on a wrapped dim, d_i-1 on an open one.
  all-reduce: reduce-scatter + all-gather.
  all-to-all: dimension by dimension, each dim bisection-limited: a dim of d chips sends d*B/4 bytes
  across its middle in each direction, over one link (open) or two (wrapped): d*B/(4*w_i), or the
  injection bound (d-1)/d*B/(2w) when that is larger (small d). This is the scaling book's "an
  all-to-all costs 1/4 of an all-gather on a bidirectional ring" (V/4/W_ici with V = d*B).
  A group whose members are s chips apart along a dim (an outer mesh axis) shares each link with s-1
  other groups, so w_i is divided by s.
- collective-permute: B/bw + alpha; on a torus one link, one way.
Hierarchical groups (several spans) use the standard 2-level schemes, applied recursively:
all-gather = gather across the outer levels on B/n_inner, then inside; reduce-scatter mirrors it;
all-reduce = reduce-scatter inside, all-reduce across on B/n_inner, all-gather inside; all-to-all =
max(the part that stays inside, the part that leaves over the outer levels: (n-n_inner)/n*B);
permute = the outermost level's (the slowest link bounds a transfer that crosses it).
`efficiency` multiplies every bandwidth (achievable / published peak).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from codesign.hardware.catalog import NetworkLevel

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE = "all-gather", "reduce-scatter", "all-reduce"
ALL_TO_ALL, PERMUTE = "all-to-all", "collective-permute"
KINDS = (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, ALL_TO_ALL, PERMUTE)
_ALIASES = {
    "allgather": ALL_GATHER,
    "reducescatter": REDUCE_SCATTER,
    "allreduce": ALL_REDUCE,
    "alltoall": ALL_TO_ALL,
    "permute": PERMUTE,
    "send-recv": PERMUTE,
    "sendrecv": PERMUTE,
    "send": PERMUTE,
    "recv": PERMUTE,
    "ppermute": PERMUTE,
    "collectivepermute": PERMUTE,
}


@dataclass(frozen=True)
class Span:
    """The part of a collective's group that sits on one network level.

    size: devices of the group on this level. On a torus level, dims are the (parts of) torus dims the
    group takes, product == size; wraps says per dim whether the group closes a ring through a
    wraparound link; strides is the chip spacing of the group's members along each dim (1 = adjacent).
    Left empty on a torus, dims default to the level's slice when the group fills it, else one open dim.
    """

    level: NetworkLevel
    size: int
    dims: tuple[int, ...] = ()
    wraps: tuple[bool, ...] = ()
    strides: tuple[int, ...] = ()

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"a span needs at least 1 device, got {self.size}")
        if self.level.topology != "torus":
            object.__setattr__(self, "dims", ())
            object.__setattr__(self, "wraps", ())
            object.__setattr__(self, "strides", ())
            return
        dims, wraps = tuple(self.dims), tuple(self.wraps)
        if not dims:
            lv = self.level
            full = lv.torus_dims and math.prod(lv.torus_dims) == self.size
            dims, wraps = (lv.torus_dims, lv.wraps) if full else ((self.size,), (False,))
        wraps = wraps or (False,) * len(dims)
        strides = tuple(self.strides) or (1,) * len(dims)
        if math.prod(dims) != self.size or len(wraps) != len(dims) or len(strides) != len(dims):
            raise ValueError(
                f"span on {self.level.name}: dims {dims} must multiply to size {self.size} "
                f"and wraps/strides need one entry per dim"
            )
        object.__setattr__(self, "dims", tuple(int(d) for d in dims))
        object.__setattr__(self, "wraps", tuple(bool(w) for w in wraps))
        object.__setattr__(self, "strides", tuple(int(s) for s in strides))

    def torus_parts(self) -> list[tuple[int, bool, float]]:
        """(dim size, wraps, one-way link bandwidth available to this group) per torus dim of size > 1."""
        return [
            (d, w, self.level.bytes_per_s / s)
            for d, w, s in zip(self.dims, self.wraps, self.strides)
            if d > 1
        ]


SpanLike = Span | tuple  # a Span or (NetworkLevel, size)
Spans = SpanLike | Sequence[SpanLike]


def as_spans(spans: Spans) -> list[Span]:
    """Normalize to a list of Spans, innermost first, dropping levels the group does not spread over."""
    if isinstance(spans, Span) or (isinstance(spans, tuple) and spans and isinstance(spans[0], NetworkLevel)):
        spans = [spans]
    out = []
    for s in spans:
        s = s if isinstance(s, Span) else Span(*s)
        if s.size > 1:
            out.append(s)
    return out


def normalize_kind(kind: str) -> str:
    k = kind.lower().replace("_", "-")
    if k in KINDS:
        return k
    k2 = _ALIASES.get(k.replace("-", "")) or _ALIASES.get(k)
    if k2 is None:
        raise ValueError(f"unknown collective {kind!r}; known: {list(KINDS)} (and send-recv)")
    return k2


# ------------------------------------------------------------------------------------- one level


def _check(bytes_per_device: float, efficiency: float) -> None:
    if bytes_per_device < 0:
        raise ValueError(f"bytes_per_device must be >= 0, got {bytes_per_device}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")


def _hops(span: Span) -> int:
    """Latency steps of a (bidirectional, where wrapped) ring over the span's torus dims."""
    return sum(s * (d // 2 if w else d - 1) for d, w, s in zip(span.dims, span.wraps, span.strides) if d > 1)


def _gather_1(b: float, s: Span, eff: float) -> float:
    n, lv = s.size, s.level
    if n == 1:
        return 0.0
    if lv.topology == "switch":
        return (n - 1) / n * b / (lv.bytes_per_s * eff) + (n - 1) * lv.latency_s
    bw = sum(w * (2.0 if wrap else 1.0) for _, wrap, w in s.torus_parts())
    return (n - 1) / n * b / (bw * eff) + _hops(s) * lv.latency_s


def _all_reduce_1(b: float, s: Span, eff: float) -> float:
    n, lv = s.size, s.level
    if n == 1:
        return 0.0
    ring = 2 * _gather_1(b, s, eff)
    if lv.topology != "switch":
        return ring  # halving-doubling and trees do not map onto nearest-neighbour links
    bw, a, logn = lv.bytes_per_s * eff, lv.latency_s, math.ceil(math.log2(n))
    options = [ring, 2 * b / bw + 2 * logn * a]  # ring, double binary tree
    if n & (n - 1) == 0:
        options.append(2 * (n - 1) / n * b / bw + 2 * logn * a)  # recursive halving-doubling
    return min(options)


def _all_to_all_1(b: float, s: Span, eff: float) -> float:
    n, lv = s.size, s.level
    if n == 1:
        return 0.0
    if lv.topology == "switch":
        return (n - 1) / n * b / (lv.bytes_per_s * eff) + lv.latency_s
    t = 0.0
    for d, wrap, w in s.torus_parts():
        bisection = d * b / (4 * w * eff * (2.0 if wrap else 1.0))
        injection = (d - 1) / d * b / (2 * w * eff)
        t += max(bisection, injection)
    return t + _hops(s) * lv.latency_s


def _permute_1(b: float, s: Span, eff: float) -> float:
    lv = s.level
    for d, stride in zip(s.dims, s.strides):
        if d > 1:  # a shift along the first dim the group spreads over: one link, one way, shared
            return b * stride / (lv.bytes_per_s * eff) + stride * lv.latency_s
    return b / (lv.bytes_per_s * eff) + lv.latency_s


# ---------------------------------------------------------------------------------- hierarchical


def _gather(b: float, spans: list[Span], eff: float) -> float:
    if not spans:
        return 0.0
    inner, outer = spans[0], spans[1:]
    return _gather(b / inner.size, outer, eff) + _gather_1(b, inner, eff)


def _all_reduce(b: float, spans: list[Span], eff: float) -> float:
    if not spans:
        return 0.0
    if len(spans) == 1:
        return _all_reduce_1(b, spans[0], eff)
    inner, outer = spans[0], spans[1:]
    return 2 * _gather_1(b, inner, eff) + _all_reduce(b / inner.size, outer, eff)


def _all_to_all(b: float, spans: list[Span], eff: float) -> float:
    if not spans:
        return 0.0
    inner, outer = spans[0], spans[1:]
    n = math.prod(s.size for s in spans)
    # The inner part exchanges b/n with each of inner.size-1 peers: an all-to-all of b*inner/n.
    # Every device's traffic to other groups, (n - inner)/n * b, leaves over its own outer link.
    return max(_all_to_all_1(b * inner.size / n, inner, eff), _all_to_all(b, outer, eff))


def all_gather_time(bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    """Seconds to all-gather a buffer of bytes_per_device (the gathered size) over the spans."""
    _check(bytes_per_device, efficiency)
    return _gather(bytes_per_device, as_spans(spans), efficiency)


def reduce_scatter_time(bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    """Seconds to reduce-scatter a buffer of bytes_per_device (the size before scattering)."""
    # The mirror image of all-gather: same bytes on the same links, in the opposite order.
    return all_gather_time(bytes_per_device, spans, efficiency)


def all_reduce_time(bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    _check(bytes_per_device, efficiency)
    return _all_reduce(bytes_per_device, as_spans(spans), efficiency)


def all_to_all_time(bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    _check(bytes_per_device, efficiency)
    return _all_to_all(bytes_per_device, as_spans(spans), efficiency)


def permute_time(bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    """Seconds for every device to send bytes_per_device to one peer (ring shift, send/recv)."""
    _check(bytes_per_device, efficiency)
    spans = as_spans(spans)
    return _permute_1(bytes_per_device, spans[-1], efficiency) if spans else 0.0


_BY_KIND = {
    ALL_GATHER: all_gather_time,
    REDUCE_SCATTER: reduce_scatter_time,
    ALL_REDUCE: all_reduce_time,
    ALL_TO_ALL: all_to_all_time,
    PERMUTE: permute_time,
}


def collective_time(kind: str, bytes_per_device: float, spans: Spans, efficiency: float = 1.0) -> float:
    """Seconds for one collective of `kind` (see KINDS; aliases such as "all_gather", "send-recv")."""
    return _BY_KIND[normalize_kind(kind)](bytes_per_device, spans, efficiency)


def ring_bytes_moved(kind: str, bytes_per_device: float, n: int) -> float:
    """Bytes each device sends in a ring implementation (the bandwidth term's numerator)."""
    kind = normalize_kind(kind)
    if n <= 1:
        return 0.0
    factor = {ALL_GATHER: 1, REDUCE_SCATTER: 1, ALL_REDUCE: 2, ALL_TO_ALL: 1}.get(kind)
    return bytes_per_device if factor is None else factor * (n - 1) / n * bytes_per_device


def merge_spans(groups: Iterable[Sequence[Span]], level_order: Sequence[NetworkLevel] = ()) -> list[Span]:
    """Combine the spans of several mesh axes into one group's spans: per level, switch sizes multiply
    and torus dims concatenate. Levels come out in `level_order` (innermost first; pass
    `Hardware.levels`), levels not in it after those, in order of first appearance."""
    order: list[NetworkLevel] = list(level_order)
    by_level: dict[int, list[Span]] = {}
    for spans in groups:
        for s in spans:
            key = next((i for i, lv in enumerate(order) if lv == s.level), None)
            if key is None:
                order.append(s.level)
                key = len(order) - 1
            by_level.setdefault(key, []).append(s)
    out = []
    for i in sorted(by_level):
        lv, parts = order[i], by_level[i]
        size = math.prod(p.size for p in parts)
        if lv.topology == "torus":
            out.append(
                Span(
                    lv,
                    size,
                    sum((p.dims for p in parts), ()),
                    sum((p.wraps for p in parts), ()),
                    sum((p.strides for p in parts), ()),
                )
            )
        else:
            out.append(Span(lv, size))
    return out

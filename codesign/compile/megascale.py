"""Cross-slice (DCN) collectives in a multi-slice TPU executable.

libtpu compiles the DCN part of a collective whose group spans TPU slices into a host-transfer
``send``/``recv`` pair run by the megascale runtime (the in-slice part stays an ICI collective:
reduce inside the slice, then across slices). Their frontend attributes name the collective and its
groups (seen with libtpu 0.0.52, deviceless ``get_topology_desc(..., num_slices=K)``):

* ``_xla_megascale_transfer_type="ALL_REDUCE"`` (with ``_xla_megascale_reduce_operation="SUM"``);
* ``_xla_megascale_target``: groups of device ids, either explicit, ``{{100000,300000},{100001,300001}}``,
  or compact, ``"{1,2}x{0:3}"`` = slices 1 and 2 crossed with each slice's devices 0..3. Deviceless
  device ids are ``slice * 100000 + index in the slice``, slices counted from 1.

The ``send`` carries the buffer (one collective); its ``recv`` is the same collective's other half.
"""

from __future__ import annotations

import re

_TYPE_RE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_TARGET_RE = re.compile(r'_xla_megascale_target=(?:"([^"]*)"|(\{(?:\s*\{[\d,\s]*\}\s*,?)*\s*\}))')
_COMPACT_RE = re.compile(r"^\{([\d,\s]+)\}x\{(\d+):(\d+)\}$")
SLICE_ID_STRIDE = 100_000  # deviceless device id = slice (from 1) * this + index in the slice


def is_megascale(attrs: str) -> bool:
    return "is_host_transfer=true" in attrs and "_xla_megascale_transfer_type" in attrs


def transfer_kind(attrs: str) -> str | None:
    """The collective a megascale transfer implements ("all-reduce", "all-gather", ...); None if absent."""
    m = _TYPE_RE.search(attrs)
    return m.group(1).lower().replace("_", "-") if m else None


def target_groups(attrs: str) -> list[list[int]]:
    """The transfer's groups as lists of device ids ([] when the target is absent or unreadable)."""
    m = _TARGET_RE.search(attrs)
    if not m:
        return []
    if m.group(2):  # explicit {{id,id},{id,id}}
        return [
            [int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", m.group(2)[1:-1])
        ]
    c = _COMPACT_RE.match(m.group(1).strip())
    if not c:
        return []
    slices = [int(x) for x in c.group(1).split(",") if x.strip()]
    lo, hi = int(c.group(2)), int(c.group(3))
    return [[s * SLICE_ID_STRIDE + i for s in slices] for i in range(lo, hi + 1)]

"""Parsing of XLA's HLO text (``compiled.as_text()``) into plain Python structures.

Only what the loop-aware walk in :mod:`codesign.compile.hlo` needs: computations, their
instructions (name, shape, opcode, operand names, attribute text), shape sizes, the replica
group formats XLA prints, and while-loop trip counts. Every function here is total: text it cannot read yields an empty or
``None`` result, never an exception.

Replica-group formats seen in jax 0.10.2 HLO (CPU and the deviceless TPU compiler):

* explicit lists ``replica_groups={{0,1,2,3},{4,5,6,7}}`` (``{}`` = all devices in one group);
* iota lists ``replica_groups=[2,4]<=[8]`` and ``[4,2]<=[2,4]T(1,0)``: ``arange(prod(dims))``
  reshaped to ``dims``, transposed by ``T(...)``, reshaped to ``[num_groups, group_size]``;
* mesh-axes lists ``replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0))
  {'axis_1'}``: a compiler-made mesh (not the user's one) whose device array is an iota tile
  (``device_ids`` omitted = plain iota); the groups span the braced axes, which may be sub-axes
  ``'a':(pre)size``.

All three are expanded to explicit lists of partition ids, which the walk maps onto the user's mesh.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

DTYPE_BYTES: dict[str, float] = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "f16": 2,
    "bf16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "s4": 0.5,
    "u4": 0.5,
    "s2": 0.25,
    "u2": 0.25,
    "s1": 0.125,
    "u1": 0.125,
    "token": 0,
}  # f8*/f4*/f6* handled by prefix in dtype_bytes()

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=?\s]*)\]")
_LAYOUT_RE = re.compile(r"(?<=\])\{[^{}]*\}")
_NAME_RE = re.compile(r"%([\w.\-]+)")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    for prefix, size in (("f8", 1), ("f6", 0.75), ("f4", 0.5)):
        if dtype.startswith(prefix):
            return size
    return 0


def array_shapes(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """All ``dtype[dims]`` arrays in a (possibly tuple) shape, layouts ignored."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(_LAYOUT_RE.sub("", shape_text)):
        try:
            out.append((dtype, tuple(int(d.replace("<=", "").strip()) for d in dims.split(",") if d.strip())))
        except ValueError:
            continue
    return out


def shape_bytes(shape_text: str) -> float:
    return sum(dtype_bytes(t) * int(np.prod(d, dtype=np.int64)) for t, d in array_shapes(shape_text))


def shape_elems(shape_text: str) -> int:
    """Elements of the first array in the shape (the natural 'output elements' of an op)."""
    arrays = array_shapes(shape_text)
    return int(np.prod(arrays[0][1], dtype=np.int64)) if arrays else 0


def first_dtype(shape_text: str) -> str:
    arrays = array_shapes(shape_text)
    return arrays[0][0] if arrays else ""


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    operand_text: str
    attrs: str
    root: bool = False


@dataclass
class Computation:
    name: str
    is_entry: bool
    instrs: list[Instr] = field(default_factory=list)
    by_name: dict[str, Instr] = field(default_factory=dict)
    root: Instr | None = None

    def users(self, name: str) -> list[Instr]:
        return [i for i in self.instrs if name in i.operands]


@dataclass
class Module:
    computations: dict[str, Computation]
    entry: str | None
    num_partitions: int | None
    skipped_lines: int
    scheduled: bool = False  # `is_scheduled=true`: each computation is printed in its execution order


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket group opening at text[start]; -1 when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def parse_instruction(line: str) -> Instr | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    if rest.startswith("("):
        end = _balanced(rest, 0, "(", ")")
        if end < 0:
            return None
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end], rest[end:].lstrip()
    if rest.startswith("{"):  # layout separated from the shape (should not happen, but be lenient)
        lend = _balanced(rest, 0, "{", "}")
        rest = rest[lend:].lstrip() if lend > 0 else rest
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    oend = _balanced(rest, om.end() - 1, "(", ")")
    if oend < 0:
        return None
    operand_text = rest[om.end() : oend - 1]
    return Instr(
        name=name,
        shape=_LAYOUT_RE.sub("", shape),
        opcode=om.group(1),
        operands=_NAME_RE.findall(operand_text),
        operand_text=operand_text,
        attrs=rest[oend:],
        root=root,
    )


def parse_module(text: str) -> Module:
    comps: dict[str, Computation] = {}
    entry = None
    skipped = 0
    cur: Computation | None = None
    m = re.search(r"num_partitions=(\d+)", text[:4000])
    num_partitions = int(m.group(1)) if m else None
    for line in text.splitlines():
        stripped = line.strip()
        if cur is None:
            hm = _HEADER_RE.match(stripped)
            if hm:
                cur = Computation(name=hm.group(2), is_entry=bool(hm.group(1)))
            continue
        if stripped == "}":
            comps[cur.name] = cur
            if cur.is_entry:
                entry = cur.name
            cur = None
            continue
        if not stripped or stripped.startswith("//"):
            continue
        ins = parse_instruction(line)
        if ins is None:
            skipped += 1
            continue
        cur.instrs.append(ins)
        cur.by_name[ins.name] = ins
        if ins.root:
            cur.root = ins
    if cur is not None:  # truncated text: keep what was read
        comps[cur.name] = cur
        skipped += 1
    for c in comps.values():
        if c.root is None and c.instrs:
            c.root = c.instrs[-1]
    if entry is None and comps:
        entry = list(comps)[-1]
    return Module(comps, entry, num_partitions, skipped, "is_scheduled=true" in text[:4000])


def attr(attrs: str, key: str) -> str | None:
    """Value text of ``key=...`` in an attribute string (braces/parens balanced)."""
    m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", attrs)
    if not m:
        return None
    i = m.end()
    if i < len(attrs) and attrs[i] in "{(":
        close = "}" if attrs[i] == "{" else ")"
        end = _balanced(attrs, i, attrs[i], close)
        return attrs[i:end] if end > 0 else None
    end = i
    while end < len(attrs) and attrs[end] not in ", ":
        end += 1
    return attrs[i:end]


def int_list(text: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text or "")]


def called(attrs: str, key: str) -> list[str]:
    v = attr(attrs, key)
    return _NAME_RE.findall(v) if v else []


def _iota(dims: list[int], perm: list[int]) -> np.ndarray:
    arr = np.arange(int(np.prod(dims, dtype=np.int64))).reshape(dims)
    return arr.transpose(perm) if perm else arr


def _iota_text(text: str) -> np.ndarray | None:
    """``[2,4]T(1,0)`` or ``[a,b]<=[2,4]T(1,0)`` → the flat device order; None if unreadable."""
    m = re.search(r"(?:\[[\d,]*\]<=)?\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        return None
    return _iota(int_list(m.group(1)), int_list(m.group(2))).ravel()


_MESH_RG_RE = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\((?P<ids>.*?)\))?\s*\{(?P<grp>[^}]*)\}"
)
_IOTA_RG_RE = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _mesh_groups(axes_text: str, ids_text: str | None, grp_text: str) -> list[list[int]] | None:
    names, sizes = [], []
    for n, s in re.findall(r"'?([^'=,\s]+)'?\s*=\s*(\d+)", axes_text):
        names.append(n)
        sizes.append(int(s))
    total = int(np.prod(sizes, dtype=np.int64))
    if ids_text:
        ids = _iota_text(ids_text) if "[" in ids_text else np.array(int_list(ids_text))
        if ids is None or ids.size != total:
            return None
    else:
        ids = np.arange(total)
    refs = []  # (mesh dim, pre_size or None, size)
    for n, pre, sz in re.findall(r"'?([^':,\s]+)'?(?::\((\d+)\)(\d+))?", grp_text):
        if n not in names:
            return None
        d = names.index(n)
        refs.append((d, int(pre), int(sz)) if pre else (d, None, sizes[d]))
    pieces, ref_piece = [], {}
    for d, full in enumerate(sizes):
        subs = sorted((r for r in refs if r[0] == d), key=lambda r: r[1] or 1)
        if not subs:
            pieces.append(full)
            continue
        prefix = 1
        for r in subs:
            pre = r[1] or 1
            if pre != prefix:
                pieces.append(pre // prefix)
                prefix = pre
            ref_piece[r] = len(pieces)
            pieces.append(r[2])
            prefix *= r[2]
        if prefix != full:
            pieces.append(full // prefix)
    grouped = [ref_piece[r] for r in refs]
    order = [i for i in range(len(pieces)) if i not in grouped] + grouped
    group_size = int(np.prod([pieces[i] for i in grouped], dtype=np.int64))
    arr = ids.reshape(pieces).transpose(order).reshape(-1, group_size)
    return arr.tolist()


def replica_groups(attrs: str, n_devices: int | None) -> list[list[int]] | None:
    """Replica groups of a collective as explicit lists of ids; None when absent/unreadable."""
    try:
        m = _MESH_RG_RE.search(attrs)
        if m:
            return _mesh_groups(m.group("axes"), m.group("ids"), m.group("grp"))
        m = _IOTA_RG_RE.search(attrs)
        if m:
            shape = int_list(m.group(1))
            return _iota(int_list(m.group(2)), int_list(m.group(3))).reshape(shape).tolist()
        v = attr(attrs, "replica_groups")
        if v is None or not v.startswith("{"):
            return None
        groups = [int_list(g) for g in re.findall(r"\{([\d,\s]*)\}", v[1:-1])]
        groups = [g for g in groups if g]
        if not groups:
            return [list(range(n_devices))] if n_devices else None
        return groups
    except (ValueError, IndexError, TypeError):
        return None


def source_target_pairs(attrs: str) -> list[tuple[int, int]]:
    v = attr(attrs, "source_target_pairs") or ""
    return [(int(a), int(b)) for a, b in re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", v)]


# -- while-loop trip counts (TPU HLO has no known_trip_count) ----------------------------------


def _scalar_const(comp: Computation, name: str, depth: int = 0) -> int | None:
    ins = comp.by_name.get(name)
    if ins is None or depth > 8:
        return None
    if ins.opcode == "constant":
        v = int_list(ins.operand_text)
        return v[0] if len(v) == 1 and array_shapes(ins.shape)[0][1] == () else None
    if ins.opcode in ("copy", "convert", "bitcast", "reshape") and ins.operands:
        return _scalar_const(comp, ins.operands[0], depth + 1)
    return None


def _gte_index(comp: Computation, name: str, depth: int = 0) -> int | None:
    ins = comp.by_name.get(name)
    if ins is None or depth > 8:
        return None
    if ins.opcode == "get-tuple-element":
        src = comp.by_name.get(ins.operands[0]) if ins.operands else None
        if src is not None and src.opcode == "parameter":
            v = int_list(attr(ins.attrs, "index"))
            return v[0] if v else None
    if ins.opcode in ("copy", "convert", "bitcast", "reshape") and ins.operands:
        return _gte_index(comp, ins.operands[0], depth + 1)
    return None


_SWAP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _condition(cond: Computation, module: Module) -> tuple[int, int, str] | None:
    """(induction tuple index, limit constant, direction as 'index DIR limit') of a loop condition."""
    root = cond.root
    if root is None:
        return None
    inner, operand_map = cond, {}
    if root.opcode == "fusion":  # CPU wraps the compare in a fusion: map fused params to operands
        subs = called(root.attrs, "calls")
        inner = module.computations.get(subs[0]) if subs else None
        if inner is None or inner.root is None:
            return None
        for f in inner.instrs:
            if f.opcode == "parameter":
                idx = int_list(f.operand_text)
                if idx and idx[0] < len(root.operands):
                    operand_map[f.name] = root.operands[idx[0]]
        root_cmp = inner.root
    else:
        root_cmp = root
    if root_cmp.opcode != "compare" or len(root_cmp.operands) != 2:
        return None
    direction = attr(root_cmp.attrs, "direction") or ""
    sides = []
    for o in root_cmp.operands:
        if o in operand_map:
            sides.append((_gte_index(cond, operand_map[o]), _scalar_const(cond, operand_map[o])))
        else:
            sides.append((_gte_index(inner, o), _scalar_const(inner, o)))
    (i0, c0), (i1, c1) = sides
    if i0 is not None and c1 is not None:
        return i0, c1, direction
    if i1 is not None and c0 is not None and direction in _SWAP:
        return i1, c0, _SWAP[direction]
    return None


def _init_value(comp: Computation, tuple_name: str, index: int) -> int | None:
    t = comp.by_name.get(tuple_name)
    if t is None or t.opcode != "tuple" or index >= len(t.operands):
        return None
    return _scalar_const(comp, t.operands[index])


def _step_value(body: Computation, index: int) -> int | None:
    root = body.root
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    upd = body.by_name.get(root.operands[index])
    if upd is None or len(upd.operands) != 2 or upd.opcode not in ("add", "subtract"):
        return None
    a, b = upd.operands
    if _gte_index(body, a) == index and _scalar_const(body, b) is not None:
        c = _scalar_const(body, b)
        return c if upd.opcode == "add" else -c
    if upd.opcode == "add" and _gte_index(body, b) == index and _scalar_const(body, a) is not None:
        return _scalar_const(body, a)
    return None


def loop_trip_count(ins: Instr, comp: Computation, module: Module) -> tuple[int, str]:
    """Trip count of a while instruction and where it came from (see HloStats.while_loops)."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.attrs)
    if m:
        return int(m.group(1)), "known_trip_count"
    cond_names = called(ins.attrs, "condition")
    body_names = called(ins.attrs, "body")
    cond = module.computations.get(cond_names[0]) if cond_names else None
    body = module.computations.get(body_names[0]) if body_names else None
    parsed = _condition(cond, module) if cond else None
    if parsed is None:
        return 1, "unknown(assumed 1)"
    index, limit, direction = parsed
    init = _init_value(comp, ins.operands[0], index) if ins.operands else None
    step = _step_value(body, index) if body else None
    if init is None and direction in ("GT", "GE"):  # a count-down loop needs its start value
        return 1, "unknown(assumed 1)"
    note = "" if init is not None else "(init assumed 0)"
    init = 0 if init is None else init
    if step is None:
        step = 1 if direction in ("LT", "LE", "NE") else -1
    try:
        if direction == "LT" and step > 0:
            n = math.ceil((limit - init) / step)
        elif direction == "LE" and step > 0:
            n = (limit - init) // step + 1
        elif direction == "GT" and step < 0:
            n = math.ceil((init - limit) / -step)
        elif direction == "GE" and step < 0:
            n = (init - limit) // -step + 1
        elif direction == "NE" and step != 0 and (limit - init) % step == 0:
            n = (limit - init) // step
        else:
            return 1, "unknown(assumed 1)"
    except (ZeroDivisionError, TypeError):
        return 1, "unknown(assumed 1)"
    return max(0, int(n)), "condition-constant" + note

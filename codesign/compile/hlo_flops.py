"""The FLOPs of one HLO instruction, by the counting rules of `codesign.compile.hlo` (its docstring):
``dot`` and ``convolution`` from their shapes, and the matmul custom calls (cuBLAS/cuDNN gemms, cuDNN
flash attention, Pallas TPU splash attention) from their operands and metadata."""

from __future__ import annotations

import math
import re

import numpy as np

from codesign.arithmetic import causal_block_fraction
from codesign.compile import hlo_parse as hp
from codesign.models.attention import flash_flops


def elems(shape: str) -> int:
    return hp.shape_elems(shape)


def operand_shape(comp: hp.Computation, name: str) -> str:
    ins = comp.by_name.get(name)
    return ins.shape if ins else ""


def dot_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    lhs = hp.array_shapes(operand_shape(comp, ins.operands[0])) if ins.operands else []
    if not lhs:
        return 0.0
    dims = lhs[0][1]
    k = math.prod(dims[d] for d in hp.int_list(hp.attr(ins.attrs, "lhs_contracting_dims")) if d < len(dims))
    return 2.0 * elems(ins.shape) * k


def window_dims(attrs: str) -> list[dict[str, tuple[int, ...]]]:
    """Per spatial dim of a convolution's `window={size=1x8 pad=0_0x7_7 stride=..}`: its parameters."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in (m.group(1).split() if m else []) if "=" in kv)
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    out = []
    for i, size in enumerate(sizes):

        def pick(name, default, i=i):
            parts = fields.get(name, "").split("x")
            return parts[i] if i < len(parts) and parts[i] else default

        lo, _, _hi = pick("pad", "0_0").partition("_")
        out.append(
            {
                "size": size,
                "pad_lo": int(lo),
                "stride": int(pick("stride", "1")),
                "lhs_dilate": int(pick("lhs_dilate", "1")),
                "rhs_dilate": int(pick("rhs_dilate", "1")),
            }
        )
    return out


def valid_taps(in_size: int, out_size: int, w: dict) -> int:
    """(output position, kernel tap) pairs that read a real input element, not padding or a dilation hole.

    The TPU compiler writes some dots as convolutions with padded windows (`size=1x8 pad=0_0x7_7`);
    counting every window position would overcount those dots by the window size.
    """
    o = np.arange(out_size)[:, None]
    k = np.arange(w["size"])[None, :]
    idx = o * w["stride"] + k * w["rhs_dilate"] - w["pad_lo"]
    span = (in_size - 1) * w["lhs_dilate"] + 1
    ok = (idx >= 0) & (idx < span) & (idx % w["lhs_dilate"] == 0)
    return int(ok.sum())


def conv_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    kern = hp.array_shapes(operand_shape(comp, ins.operands[1])) if len(ins.operands) > 1 else []
    lhs = hp.array_shapes(operand_shape(comp, ins.operands[0])) if ins.operands else []
    out = hp.array_shapes(ins.shape)
    if not kern:
        return 0.0
    kdims = kern[0][1]
    labels = hp.attr(ins.attrs, "dim_labels") or ""
    m = re.match(r"([^_]*)_([^-]*)->(.*)", labels)
    if not (m and lhs and out and len(m.group(2)) == len(kdims) and "o" in m.group(2)):
        # Unknown layout: assume the output feature dim is last and no padding.
        per_out = math.prod(kdims[:-1]) if kdims else 1
        return 2.0 * elems(ins.shape) * per_out
    lhs_l, k_l, out_l = m.groups()
    ldims, odims = lhs[0][1], out[0][1]
    windows = window_dims(ins.attrs)
    spatial = sorted(c for c in k_l if c.isdigit())
    taps = 1
    for j, c in enumerate(spatial):
        w = (
            windows[j]
            if j < len(windows)
            else {"size": kdims[k_l.index(c)], "pad_lo": 0, "stride": 1, "lhs_dilate": 1, "rhs_dilate": 1}
        )
        taps *= valid_taps(ldims[lhs_l.index(c)], odims[out_l.index(c)], w)
    batch = odims[out_l.index("b")] if "b" in out_l else 1
    out_features = odims[out_l.index("f")] if "f" in out_l else 1
    in_features = kdims[k_l.index("i")] if "i" in k_l else 1
    return 2.0 * batch * out_features * in_features * taps


def gemm_custom_call_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    target = (hp.attr(ins.attrs, "custom_call_target") or "").lower()
    if not any(t in target for t in ("gemm", "matmul")):
        return 0.0
    lhs = hp.array_shapes(operand_shape(comp, ins.operands[0])) if ins.operands else []
    m = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', ins.attrs)
    if not lhs or not m:
        return 0.0
    dims = lhs[0][1]
    k = math.prod(dims[d] for d in hp.int_list(m.group(1)) if d < len(dims))
    return 2.0 * elems(ins.shape) * k


def fmha_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    """cuDNN flash attention: q [B,T,N,H] and k [B,S,K,H] (JAX's BTNH layout) are operands 0 and 1."""
    target = hp.attr(ins.attrs, "custom_call_target") or ""
    if "fmha" not in target.lower() or len(ins.operands) < 2:
        return 0.0
    q = hp.array_shapes(operand_shape(comp, ins.operands[0]))
    k = hp.array_shapes(operand_shape(comp, ins.operands[1]))
    if not q or not k or len(q[0][1]) != 4 or len(k[0][1]) != 4:
        return 0.0
    (b, t, n, h), s = q[0][1], k[0][1][1]
    causal = re.search(r'"mask_type"\s*:\s*"[A-Z_]*CAUSAL', ins.attrs) is not None
    fwd, bwd = flash_flops("cudnn" if causal else "full", b * n, t, s, h, h)
    return bwd if "backward" in target.lower() else fwd


_SPLASH_RE = re.compile(r"splash_m[hq]a_(fwd|dkv|dq)")


def splash_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    """Pallas TPU splash attention (a ``tpu_custom_call`` named ``splash_mha_fwd*``/``_dkv*``/``_dq*``):
    q, k and v are its first three floating-point operands of rank >= 3, head dim minor ([..., T, H],
    the kernel's default layout; leading dims batch x heads, vmapped batches included). The mask is
    assumed causal (the only one codesign builds) with the block sizes the kernel records in its
    ``xprof_metadata``: `models.attention.flash_flops` counts the tiles it computes. Forward: QK^T
    and PV; the fused backward (dkv returning dq partials too) all 5 backward dots; split, dkv 4 (QK^T,
    dO V^T, P^T dO, dS^T Q) and dq 3 (QK^T, dO V^T, dS K)."""
    if "tpu_custom_call" not in (hp.attr(ins.attrs, "custom_call_target") or ""):
        return 0.0
    phase = _SPLASH_RE.search(ins.name + " " + ins.attrs)
    if phase is None:
        return 0.0
    arrays = []
    for name in ins.operands:
        for dtype, dims in hp.array_shapes(operand_shape(comp, name)):
            if dtype.startswith(("bf", "f")) and len(dims) >= 3:
                arrays.append(dims)
    if len(arrays) < 3:
        return 0.0
    q, k, v = arrays[:3]
    (t, qk), s, hv = q[-2:], k[-2], v[-1]
    rows = math.prod(q) / (t * qk)
    meta = {key: int(val) for key, val in re.findall(r'\\?"(block_\w+)\\?":\s*(\d+)', ins.attrs)}
    kind = phase.group(1)
    suffix = {"fwd": "", "dkv": "_dkv", "dq": "_dq"}[kind]
    bq, bkv = meta.get("block_q" + suffix, t), meta.get("block_kv" + suffix, s)
    per = 2.0 * rows * t * s * causal_block_fraction(s, min(bq, t), min(bkv, s))  # flash_flops' tiles
    if kind == "fwd":
        return per * (qk + hv)
    # The fused backward returns dq beside dk and dv, as partial sums per K/V block: [..., kv blocks,
    # heads, T, H] (its metadata carries no flag).
    fused = any(len(d) == len(q) + 1 and d[-3:] == q[-3:] for _, d in hp.array_shapes(ins.shape))
    if kind == "dkv":
        return per * ((3 * qk + 2 * hv) if fused else (2 * qk + 2 * hv))
    return per * (2 * qk + hv)


def matmul_flops(ins: hp.Instr, comp: hp.Computation) -> float:
    """The matmul FLOPs of `ins` (0 for anything that is not a dot, a convolution or a matmul custom call)."""
    op = ins.opcode
    if op == "dot":
        return dot_flops(ins, comp)
    if op == "convolution":
        return conv_flops(ins, comp)
    if op == "custom-call":
        return gemm_custom_call_flops(ins, comp) or fmha_flops(ins, comp) or splash_flops(ins, comp)
    return 0.0

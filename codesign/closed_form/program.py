"""The closed form as an instrument: the CompileReport XLA would give for one (model, workload,
strategy), without compiling.

Microseconds per candidate, so the planner can rank thousands of layouts and compile only the best.
Everything is per device per step, for ONE pipeline stage (layers / pipeline; the embedding and the LM
head are both included, i.e. the stage is costed as the heaviest one). An MoE model's dense prefix
runs before the pipeline, split over the stages: each device does dense / p of its layers' work, and
its gradients (and the embedding's) reduce once per step over pipeline too (`arithmetic.stage_layers`).
Shapes below: b rows per device per microbatch = B / (data*fsdp*expert*microbatches), s = S / sequence
positions, u = b*s*d.

Matmul FLOPs (the models' einsums, sharded as `default_rules` shards them): each weight matmul is
2 x tokens x (weight elements / its tensor and expert shards); weights without a tensor-sharded dim
(norms, MLA's wq_a/wkv_a, the MoE router) are computed redundantly on every tensor rank. XLA's
attention computes the full S x S score matrix (masked), 4 b (n/tp) s S h FLOPs per layer; a fused
flash kernel (`Workload.flash`) computes only the causal tiles (see `_attention_core`). MoE experts
process E x C slots per routing group (`ModelConfig.expert_capacity`: ceil(k g capacity_factor / E) for
g tokens per group, g under dropless), so expert FLOPs scale with capacity, not k; the groups are
sharded by every batch-like axis (data, fsdp, expert) and, when the groups per row divide it,
sequence. Backward = 2 x forward; a
checkpointed layer recomputes the weight matmuls backward needs and its policy did not save
(`remat.py`: "full" all but the FFN's last matmul, whose output only feeds the residual add, so XLA
drops it as dead code; "dots" none; the named policies what their names leave out), and the attention
core where the context is not kept (selective: the scores only).

Collectives, as XLA's SPMD partitioner emits them (studied on the tiny presets, 8 CPU devices; see
tests/test_analytic.py). Per microbatch unless noted:
- fsdp: every layer's fsdp-sharded weights all-gathered in forward AND again in backward (with or
  without remat); the LM head gathered once per step (hoisted out of the microbatch loop); the
  embedding is looked up on its d-shard and redistributed by an all-to-all of b*s*d (fwd and bwd),
  so its gradient needs no reduction. Gradients: a reduce-scatter per param over fsdp (XLA:CPU writes
  it as all-reduce + dynamic-slice, so the CPU lowering reports all-reduce of the full size).
- sequence / expert (for non-expert params) are replicas of each param: its gradient is all-reduced
  over them (after the fsdp scatter, at the scattered size), inside the microbatch loop.
- data (the pure replicas, `replica_axes`): the train step accumulates unreduced gradients and
  reduces them itself once per step, in the params' dtype: one all-reduce, or under ZeRO one
  reduce-scatter over data (zero=2: one per microbatch, into the sharded accumulator) and one
  all-gather of the updated params. With one microbatch and no ZeRO, XLA's own per-param reduction.
  ZeRO over expert (an MoE's non-expert params): their update is a local slice of the gradient that
  expert already reduced, so it adds only `expert` to the all-gather of the updated params.
- tensor (Megatron): one all-reduce of a partial sum per matmul that contracts a tensor-sharded dim.
  Forward: attention output, FFN output (MoE: routed y_e and the shared expert separately).
  Backward: the input gradient of each column-parallel matmul separately (GQA: q, k, v; MLA: the
  q_lora and kv_lora latents and the broadcast RoPE key; FFN: gate and up). Remat full recomputes the
  forward all-reduces whose results backward needs and it does not keep (attention output unless
  out_proj is saved; MoE y_e unless mlpwo is). Vocab-parallel embedding lookup (fwd) and LM-head input
  gradient (bwd): one u each; cross-entropy: 3 small b*s. On TPU (libtpu 0.0.52, d1024 2 layers,
  tensor=4) XLA sums a block's partial input gradients before reducing them: one reduction for q, k
  and v, one for gate and up (`Lowering.sums_input_grads`); XLA:CPU reduces each (as one tuple).
  A fused q/k/v projection (`ModelConfig.fused_qkv`) has one input gradient on every backend: one
  reduction. Its FLOPs are the three projections' (one matmul of the concatenated width).
- tensor with sequence parallelism (sp=1): every reduction that lands in the residual stream
  (attention and FFN outputs, their recompute, the blocks' input gradients, the embedding lookup,
  the LM head's input gradient) becomes a reduce-scatter of the same u, and the normed residual is
  all-gathered (u) before each block: per layer twice forward, twice again in backward where the
  gathered copy is not kept (a checkpointed layer recomputes it; selective replays it, as Megatron
  does; remat none keeps it), and the output gradient of each block twice in backward; once forward
  before the LM head and once backward for the embedding gradient. MoE's y_e reductions stay
  all-reduces (the slots are not in the residual layout). XLA:CPU writes the reduce-scatter as
  all-reduce + dynamic-slice, so its lowering keeps the all-reduce kind; libtpu forms its
  reduce-scatter fusion at d1024 (not on the tiny presets, where the slice is fused elsewhere).
- sequence: K and V all-gathered to full length per layer (forward, and again when remat recomputes),
  their gradients reduce-scattered (CPU: all-reduced) in backward.
- expert: all-to-all of the dispatched tokens b x E x C x d, dispatch and combine, forward and backward
  (and again in a checkpointed layer); the router statistics of the load-balancing loss (B x S x E f32) are
  all-gathered over the batch axes once per forward pass. Under --matmul-dtype fp8
  (accelerator lowering) the dispatch direction moves e4m3 + 1x128-tile scales (`FP8_BYTES`), the
  combine direction BF16; the quantize passes of every FP8 GEMM operand are HBM traffic.
Bytes per element follow the backend's lowering (`Lowering`): XLA:CPU promotes bf16 reductions to
f32 and gathers f32 master weights before the bf16 cast; TPU/GPU move bf16.

Non-matmul FLOPs and transcendentals are coarse per-element counts (constants below, fitted to XLA's
own HLO op counts on the tiny presets: op counts, not hardware constants). HBM bytes: on accelerators
a kernel-by-kernel count split into matmul-kernel and memory-bound-kernel traffic
(`_accelerator_traffic`); for XLA:CPU one fitted total (`CPU_TRAFFIC`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.closed_form import dropout as DR
from codesign.closed_form import remat as R
from codesign.closed_form.memory import F32, analytic_memory
from codesign.closed_form.params import (
    Shape,
    moe_slots,
    prefix_split,
    replica_axes,
    shape_of,
    sharded_params,
    spmd_sizes,
    zero_axes,
    zero_level,
)
from codesign.config import ModelConfig, Workload
from codesign.models.attention import attention_v_head_dim, flash_flops, kernel_for
from codesign.report import Collective, CompileReport
from codesign.sharding.strategy import Strategy

# Elementwise op counts (FLOPs per element), fitted to XLA's HLO op counts on the tiny presets.
OPT_FLOPS_PER_PARAM = 20  # AdamW + global-norm clipping
ELEM_PER_RESIDUAL = 40  # per token x d per layer per pass: norms, RoPE, residual adds, casts
# The part of ELEM_PER_RESIDUAL on the residual stream itself (the two norms and residual adds), which
# sequence parallelism divides by tensor: fitted to the drop XLA:CPU shows with sp=1 (tiny-dense,
# data=2,tensor=4: 434k of 2.26M elementwise FLOPs).
ELEM_PER_NORM = 9
ELEM_PER_FFN = 6  # per token x ffn width: SiLU/GELU and the gating product
ELEM_PER_SCORE = 8  # per attention score: scale, mask, max, sub, sum, div
ELEM_PER_LOGIT = 12  # per logit: log-softmax and its gradient


# FP8 (DeepSeek-V3's recipe, `Workload.matmul_dtype == "fp8"`): e4m3 values with one f32 scale per
# 1x128 activation tile (and per 128x128 weight block), so an FP8 tensor moves 1 + 4/128 bytes per element.
FP8_BYTES = 1 + 4 / 128
# The weight matmuls that stay BF16 under fp8: the MoE router (gating) and the top-k combine. The
# attention core, embedding and LM head are costed outside `_layer_mm` and stay BF16 too.
BF16_PARTS = frozenset({"router", "combine"})


def fp8_active(workload: Workload, lw: Lowering) -> bool:
    """FP8 is priced on accelerators only: the CPU stand-in compiles (and is compared in) BF16."""
    return workload.matmul_dtype == "fp8" and lw is not CPU_LOWERING


@dataclass(frozen=True)
class Lowering:
    """How a backend lowers the SPMD program's collectives (bytes per element and the scatter op)."""

    name: str
    act_bytes: int  # activation collectives (bf16 compute)
    weight_bytes: int  # FSDP weight all-gathers (f32 master weights)
    grad_bytes: int  # gradient reductions (f32 params)
    scatter_kind: str  # how a reduce-scatter appears in the compiled module
    sums_input_grads: bool = False  # one tensor reduction per block's input gradient, not per matmul
    least_bytes: int = 1  # narrower collectives are promoted to this width (XLA:CPU: bf16 -> f32)

    def dtype(self, nbytes: int) -> str:
        return "f32" if nbytes == 4 else "bf16"

    def width(self, nbytes: float) -> float:
        """Bytes per element of a collective of `nbytes`-wide elements, as this backend runs it."""
        return max(nbytes, self.least_bytes)


# Measured on XLA:CPU (jax 0.10.2): bf16 all-reduces are promoted to f32; weights are gathered before
# the bf16 convert; reduce-scatter is all-reduce + dynamic-slice.
CPU_LOWERING = Lowering("cpu", 4, 4, 4, "all-reduce", least_bytes=4)
# libtpu 0.0.52 (v5e:2x4, tiny-dense) moves the bf16 convert before the FSDP all-gathers and reduces
# gradients in bf16; GPU is assumed to do the same (native bf16 collectives, NCCL reduce-scatter).
ACCEL_LOWERING = Lowering("accelerator", 2, 2, 2, "reduce-scatter", sums_input_grads=True)

# XLA:CPU's HBM-traffic stand-in (bytes per element), a least-squares fit to the HLO walk's bytes on the
# tiny presets (19 layouts, all within 0.8-1.2x): XLA:CPU fuses little, so AdamW alone moves ~85 B/param.
# Only used to compare with CPU compiles; accelerators use `_accelerator_traffic`'s kernel count.
CPU_TRAFFIC = {"act": 36, "weight": 13, "opt": 84, "score": 56, "logit": 24}


def lowering_for(platform: str | None) -> Lowering:
    return CPU_LOWERING if platform == "cpu" else ACCEL_LOWERING


def _attn_widths(cfg: ModelConfig, tp: int) -> tuple[float, float, float, float]:
    """Per-device (q, k, v, attention-output) widths per token of one attention layer."""
    n, qk, v = cfg.heads / tp, cfg.qk_head_dim, cfg.attn_v_head_dim
    kvh = n if cfg.attention == "mla" else cfg.kv_heads / tp  # MLA up-projects a key/value per head
    return n * qk, kvh * qk, kvh * v, n * v


def _layer_mm(cfg: ModelConfig, moe: bool, sh: Shape) -> dict[str, float]:
    """Forward FLOPs of one layer's weight matmuls per microbatch, by part (`remat.PARTS`; the MoE
    combine einsum as "combine"). The attention core (QK^T, PV) is `_attention_core`."""
    tp = sh.sizes["tensor"]
    d, n, t = cfg.hidden, cfg.heads, sh.t
    qk, v = cfg.qk_head_dim, cfg.attn_v_head_dim
    if cfg.attention == "mla":
        rope, r = cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank * n * qk / tp) if cfg.q_lora_rank else d * n * qk / tp
        qkv = q + d * (r + rope) + r * n * (cfg.qk_nope_head_dim + v) / tp
    else:
        qkv = d * (n + 2 * cfg.kv_heads) * qk / tp
    parts = {"qkv": 2 * t * qkv, "out": 2 * t * n * v * d / tp}
    gates = 2 if cfg.ffn_activation == "swiglu" else 1  # gate and up, or up alone
    if not moe:
        parts.update(wi=2 * t * gates * d * cfg.mlp_dim / tp, wo=2 * t * cfg.mlp_dim / tp * d)
        return parts
    e, k = cfg.n_routed_experts, cfg.experts_per_token
    shared = cfg.moe_mlp_dim * cfg.n_shared_experts / tp
    slots = moe_slots(cfg, sh)
    parts.update(
        router=2 * t * d * e,
        routed_wi=2 * slots * 2 * d * cfg.moe_mlp_dim / tp,
        routed_wo=2 * slots * d * cfg.moe_mlp_dim / tp,
        combine=2 * t * k * d,
        shared_wi=2 * t * gates * d * shared,
        shared_wo=2 * t * shared * d,
    )
    return parts


def _recomputed(parts: dict[str, float], remat: str) -> float:
    """Forward matmul FLOPs a layer's backward runs again under `remat` (see `remat.py`)."""
    return sum(parts.get(p, 0.0) for p in R.recomputed_parts(remat))


def fp8_matmul_flops(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> float:
    """Per-device matmul FLOPs per step that run in FP8 under `matmul_dtype="fp8"`: every weight matmul
    (forward, both backward passes, and recompute) except `BF16_PARTS`; 0 under bf16."""
    if workload.matmul_dtype != "fp8":
        return 0.0
    sh = shape_of(cfg, workload, strategy)
    total = 0.0
    for moe, layers in zip((False, True), stage_layers(cfg, strategy.size("pipeline"))):
        if layers <= 0:
            continue
        parts = {k: v for k, v in _layer_mm(cfg, moe, sh).items() if k not in BF16_PARTS}
        total += layers * (3 * sum(parts.values()) + _recomputed(parts, strategy.remat))
    return sh.m * total


def flash_kernel(workload: Workload, platform: str | None) -> str | None:
    """The flash kernel the step runs on `platform` (`models.attention.kernel_for`; None: XLA attention,
    which materializes the scores). No platform: an accelerator's (TPU's splash)."""
    return kernel_for(workload.attention, platform or "tpu") if workload.flash else None


def uses_flash(cfg: ModelConfig, workload: Workload) -> bool:
    """Whether the step runs a fused flash kernel (MLA too: `models.attention`)."""
    return workload.flash


def _attention_core(
    cfg: ModelConfig, workload: Workload, remat: str, sh: Shape, platform: str | None
) -> float:
    """Matmul FLOPs of one layer's attention core (QK^T and PV) per microbatch, forward + backward +
    recompute. XLA computes the full S x S scores (masked): 2 dots forward, 4 backward, and the forward
    again where the policy does not keep the context (`remat.core_recompute`; selective: QK^T only).
    A flash kernel computes the causal tiles only (`models.attention.flash_flops`; cuDNN with MLA's
    value head padded to the query/key head), its backward runs 5 dots (it recomputes the scores),
    and any remat recomputes its forward (the kernel is a custom call, not a dot that the dots
    policies would save, and its row statistics are not saved by any named policy)."""
    rows = sh.b * cfg.heads / sh.sizes["tensor"]
    kernel = flash_kernel(workload, platform)
    if kernel is not None:
        v = attention_v_head_dim(cfg.qk_head_dim, cfg.attn_v_head_dim, kernel)
        fwd, bwd = flash_flops(kernel, rows, sh.s, sh.seq, cfg.qk_head_dim, v)
        return fwd * (2 if remat != "none" else 1) + bwd
    per = 2 * rows * sh.s * sh.seq
    scores, pv = per * cfg.qk_head_dim, per * cfg.attn_v_head_dim
    fwd = scores + pv
    again_scores, again_pv = R.core_recompute(remat)
    return 3 * fwd + (scores if again_scores else 0.0) + (pv if again_pv else 0.0)


def _ffn_width(cfg: ModelConfig, moe: bool, tp: int) -> float:
    """Per-device FFN width per token (MoE: shared experts plus the routed slots a token fills)."""
    if not moe:
        return cfg.mlp_dim / tp
    return (
        cfg.moe_mlp_dim * cfg.n_shared_experts + cfg.experts_per_token * cfg.moe_mlp_dim * cfg.capacity_factor
    ) / tp


def _accelerator_traffic(
    cfg: ModelConfig,
    workload: Workload,
    strategy: Strategy,
    sh: Shape,
    local: float,
    gathered: float,
    platform: str | None,
) -> tuple[float, float]:
    """(bytes moved by matmul kernels, bytes moved by memory-bound kernels) per device per step on a
    GPU/TPU, counted kernel by kernel for a fused bf16 LLaMA-style layer. Per token per layer, with
    XLA fusing each elementwise chain between two matmuls into one kernel (bf16, 2 bytes):
      forward: two residual-add + RMSNorm fusions (read x and the branch, write x and x_norm: 8d each),
               RoPE on q and k (read + write: 4(q+k)), the FFN activation (gated: read gate and up,
               write h: 6F; ungated 4F);
      backward: two norm backwards (read dy, x and the residual grad, write dx: 8d each), RoPE's (4(q+k)),
               the activation's (gated: read dh, gate, up, write dgate, dup: 10F; ungated 6F);
      remat none (and selective) additionally writes and rereads the activation's saved output (4F);
      a checkpointed layer runs the forward elementwise kernels twice and the matmul kernels it
      recomputes (`remat.py`) twice; under sp the residual stream's kernels (the 16d terms) touch
      1/tensor of the positions.
    XLA attention: per score, the softmax reads the f32 scores and writes bf16 probabilities (6 per
    forward pass) and its backward reads P and dP and writes dS (8); the score dots' own reads and
    writes are matmul traffic. A flash kernel keeps scores on chip: only q, k, v, o and their
    gradients, all matmul traffic. Per step: cross-entropy reads the bf16 logits twice and writes
    their gradient (8 per logit); f32 master weights are cast to bf16 at each use (read 4, write 2);
    AdamW + the clipping norm read param, grad, mu, nu and grad again and write param, mu, nu (8 x the
    param bytes; optax keeps mu and nu in the param dtype); microbatches accumulate f32 gradients
    (read + write 8); the embedding lookup and its scatter-add gradient.
    Matmul kernels: every weight matmul reads its input and weight and writes its output in each of
    forward (and recompute), input-gradient and weight-gradient passes. `local` and `gathered` are the
    param elements per device the stage's microbatches use, sharded and after the FSDP gathers."""
    m, tp, p = sh.m, sh.sizes["tensor"], strategy.size("pipeline")
    bf, d, t = 2, cfg.hidden, sh.t
    remat = strategy.remat
    ew_passes = 2 if R.layer_checkpointed(remat) else 1  # forward elementwise kernels
    res = sh.act.res  # residual-stream width per token (d/tensor under sp)
    gated_ffn = cfg.ffn_activation == "swiglu"
    mm_elems = other = quantized = 0.0  # per microbatch
    w_again = w_total = 0.0  # weight matmul FLOPs recomputed / run forward (weights re-read)
    flash = flash_kernel(workload, platform) is not None
    dropout_bytes = DR.embedding_dropout(cfg, sh).hbm_bytes  # per microbatch, in bytes
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        dropout_bytes += layers * DR.layer_dropout(cfg, remat, sh, flash).hbm_bytes
        parts = _layer_mm(cfg, moe, sh)
        again = _recomputed(parts, remat) / sum(parts.values())
        w_again += layers * _recomputed(parts, remat)
        w_total += layers * sum(parts.values())
        qw, kw, vw, ow = _attn_widths(cfg, tp)
        width = _ffn_width(cfg, moe, tp)
        gated = gated_ffn or moe
        io = t * ((d + qw + kw + vw) + (ow + d) + (d + (2 if gated else 1) * width) + (width + d))
        mm_elems += layers * io * (1 + again + 2)
        # FP8: each GEMM operand is quantized where it is used (read bf16, write e4m3 + tile scales):
        # the input forward (and in recompute), and in backward the input (transposed tiles for the
        # weight gradient) and the output gradient twice (input and weight gradients).
        quantized += layers * io / 2 * (2 + again + 2)
        fwd = 16 * res + 4 * (qw + kw) + (6 if gated else 4) * width
        bwd = 16 * res + 4 * (qw + kw) + (10 if gated else 6) * width
        per_token = fwd * ew_passes + bwd + (4 * width if not R.layer_checkpointed(remat) else 0)
        other += layers * t * per_token
        if moe:  # dispatch gather and combine scatter of the routed tokens, forward and backward
            other += layers * 4 * moe_slots(cfg, sh) * d * bf * (ew_passes + 1)
        scores = sh.b * (cfg.heads / tp) * sh.s * sh.seq
        kernel = flash_kernel(workload, platform)
        if kernel is not None:  # cuDNN reads and writes MLA's value head padded
            pad = attention_v_head_dim(cfg.qk_head_dim, cfg.attn_v_head_dim, kernel) / cfg.attn_v_head_dim
            io = qw + kw + (vw + ow) * pad
            mm_elems += layers * t * io * (1 + again + 2 + (1 if remat != "none" else 0))
        else:
            core_fwd = 1 + (1 if any(R.core_recompute(remat)) else 0)
            mm_elems += layers * scores * (6 * core_fwd + 10) / bf  # f32 score writes counted as 2 bf16
            other += layers * scores * (6 * core_fwd + 8)
    logits = t * sh.act.vocab
    mm_elems += 3 * t * (d + sh.act.vocab)  # LM head: forward, input grad, weight grad
    other += 8 * logits + 14 * t * d  # cross-entropy; embedding lookup and its scatter-add gradient
    pb = workload.param_bytes
    w_frac = w_again / w_total if w_total else 0.0
    mm_w = bf * gathered * (1 + w_frac + 2)  # weight reads (forward, recompute, input grad), dW writes
    cast = (F32 + bf) * gathered * (1 + w_frac + 1) if pb == F32 else 0.0
    ub = workload.update_bytes  # the accumulator's, and what AdamW updates (a master copy, else params)
    accumulate = 2 * ub * local if m > 1 else 0.0
    # AdamW: the update target, its gradient and moments read and written; a master copy's new
    # params written again in their own dtype.
    optimizer = (8 * ub + (pb if workload.master_dtype else 0.0)) * local
    matmul_bytes = m * (bf * mm_elems + mm_w)
    memory_bound = m * (bf * other + cast + accumulate + dropout_bytes) + optimizer
    if workload.matmul_dtype == "fp8":  # quantize passes; weights (W and W^T blocks) once per step
        memory_bound += m * quantized * (bf + FP8_BYTES) + 2 * gathered * (pb + FP8_BYTES)
    return matmul_bytes, memory_bound


class _Coll:
    def __init__(self, strategy: Strategy):
        self.order = [a for a, _ in strategy.mesh if a != "pipeline"]
        self.sizes = spmd_sizes(strategy)
        self.rows: dict[tuple, float] = {}

    def add(self, kind: str, nbytes: float, axes, count: float, dtype: str) -> None:
        axes = tuple(a for a in self.order if a in axes and self.sizes[a] > 1)
        if not axes or count <= 0 or nbytes <= 0:
            return
        key = (kind, round(nbytes), math.prod(self.sizes[a] for a in axes), axes, dtype)
        self.rows[key] = self.rows.get(key, 0.0) + count

    def collectives(self) -> tuple[Collective, ...]:
        return tuple(
            Collective(kind=k, bytes=b, group_size=g, mesh_axes=ax, count=max(1, round(c)), dtype=dt)
            for (k, b, g, ax, dt), c in sorted(self.rows.items(), key=lambda kv: kv[0][:2])
        )


def _weights_and_grads(cfg, strategy, workload, sh: Shape, lw: Lowering, c: _Coll) -> None:
    z, m = sh.sizes, sh.m
    wdt, gdt = lw.dtype(lw.weight_bytes), lw.dtype(lw.grad_bytes)
    # The train step reduces over the pure data replicas itself, once per step
    # (a full-manual psum, or under ZeRO a psum_scatter over data and an all-gather of the updated
    # params); every other axis is left to the partitioner, which reduces per microbatch.
    # With one microbatch and no ZeRO the step keeps XLA's own reduction (there is nothing to hoist).
    replica, zero = set(replica_axes(cfg, strategy)), zero_level(cfg, strategy)
    if m == 1 and not zero:
        replica = set()
    # The once-per-step reductions run in what the optimizer updates (f32 with a master copy: the
    # accumulated gradients); the updated params are gathered back in their own dtype.
    ub, pb = lw.width(workload.update_bytes), lw.width(workload.param_bytes)
    udt, pdt = lw.dtype(ub), lw.dtype(pb)
    prefix = prefix_split(cfg, strategy.size("pipeline"))
    combined: dict[tuple, float] = {}
    scattered = 0.0
    gathered_back: dict[tuple[str, ...], float] = {}
    for sp in sharded_params(cfg, strategy):
        name, full = sp.group.name, sp.local_elems
        per_step = sp.count
        passes = 1 if prefix and sp.group.where == "dense" else m  # the prefix: one pass on the whole batch
        fsdp = "fsdp" in sp.axes
        if fsdp:
            gathered = full * z["fsdp"] * lw.weight_bytes
            if sp.group.where != "global":
                c.add("all-gather", gathered, ("fsdp",), 2 * per_step * passes, wdt)  # forward + backward
            elif name != "embed":
                c.add("all-gather", gathered, ("fsdp",), 1, wdt)  # hoisted out of the microbatch loop
        # Gradient reductions: over every token axis that does not shard this param; expert
        # weights receive their tokens by all-to-all, so the expert axis is not a replica for them.
        replicas = [a for a in strategy.token_axes if z[a] > 1 and a not in sp.axes]
        if name.startswith("moe.w_"):
            replicas = [a for a in replicas if a != "expert"]
        if fsdp and name != "embed":
            c.add(lw.scatter_kind, full * z["fsdp"] * lw.grad_bytes, ("fsdp",), per_step * passes, gdt)
        axes = tuple(a for a in replicas if not (fsdp and a == "fsdp"))
        inner = tuple(a for a in axes if a not in replica)
        outer = tuple(a for a in axes if a in replica)
        if prefix and "pipeline" in sp.axes:
            # The prefix's layers, sharded over the stages: their gradients reduce over the other
            # batch axes once per step, as one array (over pipeline: `params.pipeline_transfers`).
            if inner:
                combined[(inner, 1, gdt)] = (
                    combined.get((inner, 1, gdt), 0.0) + full * per_step * lw.grad_bytes
                )
            inner = ()
        elif prefix and (sp.group.where == "dense" or name == "embed"):
            # The prefix ran once on the whole batch, split over the stages: its gradients reduce
            # over pipeline too, once per step, as one array.
            axes = (*inner, "pipeline")
            combined[(axes, 1, gdt)] = combined.get((axes, 1, gdt), 0.0) + full * per_step * lw.grad_bytes
            inner = ()
        if inner:
            combined[(inner, per_step * m, gdt)] = (
                combined.get((inner, per_step * m, gdt), 0.0) + full * lw.grad_bytes
            )
        rest = tuple(a for a in outer if a != "data") if zero else outer
        if rest:  # stacked layers reduce as one array: one collective per step for all of them
            combined[(rest, 1, udt)] = combined.get((rest, 1, udt), 0.0) + full * per_step * ub
        if zero and "data" in outer:
            scattered += full * per_step * ub
        back = tuple(a for a in zero_axes(cfg, strategy) if a not in sp.axes) if zero else ()
        if back:  # the updated params, gathered over the ZeRO axes that slice their update
            gathered_back[back] = gathered_back.get(back, 0.0) + full * per_step * pb
    # XLA's all-reduce combiner merges the gradient reductions that run together (one layer's, or
    # the globals') into one collective: one latency per group, not one per param.
    for (axes, count, dt), nbytes in combined.items():
        c.add("all-reduce", nbytes, axes, count, dt)
    if scattered:  # written as psum_scatter, so a reduce-scatter on every backend (zero=2: per microbatch)
        c.add("reduce-scatter", scattered, ("data",), m if zero == 2 else 1, udt)
    for axes, nbytes in gathered_back.items():  # once per step
        c.add("all-gather", nbytes, axes, 1, pdt)


def _activations(cfg, strategy, workload, sh: Shape, lw: Lowering, c: _Coll) -> None:
    z, m = sh.sizes, sh.m
    ab, adt = lw.act_bytes, lw.dtype(lw.act_bytes)
    p = strategy.size("pipeline")
    u = sh.t * cfg.hidden * ab
    rec = R.recomputed_parts(strategy.remat)
    core_again = any(R.core_recompute(strategy.remat))
    swiglu = 2 if cfg.ffn_activation == "swiglu" else 1
    # Reductions that land in the residual stream: reduce-scatters under sp, all-reduces without.
    sp = sh.act.res_tensor
    resid_kind = lw.scatter_kind if sp else "all-reduce"
    if cfg.attention == "mla":
        lat = (cfg.q_lora_rank or cfg.hidden) + cfg.kv_lora_rank + cfg.qk_rope_head_dim
        attn_bwd = [sh.t * lat * ab]
    else:
        attn_bwd = [u] if lw.sums_input_grads or cfg.fused_qkv else [u] * 3  # fused: one input gradient
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        n = layers * m
        if z["tensor"] > 1:
            ue = moe_slots(cfg, sh) * cfg.hidden * ab if moe else 0.0
            dense_ffn = not moe or cfg.n_shared_experts
            resid = [u] + ([u] if dense_ffn else []) + ([u] if "out" in rec else [])
            resid += [u] if dense_ffn and rec & {"wo", "shared_wo"} else []  # full_layer's rerun FFN
            # Routed experts are always gated (gate and up); the dense/shared FFN follows the config.
            ffn_bwd = [u] * (1 if lw.sums_input_grads else swiglu) if dense_ffn else []
            for x in resid + attn_bwd + ffn_bwd:
                c.add(resid_kind, x, ("tensor",), n, adt)
            slots = [ue] + ([ue] if "routed_wo" in rec else []) + ([ue] * 2 if moe else [])
            for x in slots:  # MoE y_e partial sums at the slot layout (fwd, recompute) and dx_e (bwd)
                c.add("all-reduce", x, ("tensor",), n, adt)
            if sp:  # normed residual before each block (fwd, and again in bwd: R.regathered), dy
                c.add("all-gather", u, ("tensor",), (4 + R.regathered(strategy.remat, moe)) * n, adt)
        if z["sequence"] > 1:
            kvh = cfg.heads if cfg.attention == "mla" else cfg.kv_heads
            for width in (cfg.qk_head_dim, cfg.attn_v_head_dim):
                kv = sh.b * sh.seq * kvh / z["tensor"] * width * ab
                c.add("all-gather", kv, ("sequence",), n * (2 if core_again else 1), adt)
                c.add(lw.scatter_kind, kv, ("sequence",), n, adt)
        if moe and z["expert"] > 1:  # dispatch and combine, fwd and bwd, and again in a checkpointed
            # layer: no policy names the dispatched tokens (measured on tiny-moe: minimal re-runs both)
            # Each direction twice (dispatch, and the combine's gradient going the same way; combine
            # and the dispatch's gradient), once more each in a checkpointed layer. Under fp8 the
            # dispatch direction moves e4m3 + scales and the combine stays BF16, as DeepSeek-V3 does.
            again = 1 if R.layer_checkpointed(strategy.remat) else 0
            tokens = moe_slots(cfg, sh) * cfg.hidden
            if fp8_active(workload, lw):
                c.add("all-to-all", tokens * FP8_BYTES, ("expert",), n * (2 + again), "fp8")
            else:
                c.add("all-to-all", tokens * ab, ("expert",), n * (2 + again), adt)
            c.add("all-to-all", tokens * ab, ("expert",), n * (2 + again), adt)
    if z["tensor"] > 1:  # vocab-parallel embedding (fwd), LM-head input grad (bwd), cross-entropy stats
        c.add(resid_kind, u, ("tensor",), 2 * m, adt)
        c.add("all-reduce", sh.t * F32, ("tensor",), 3 * m, "f32")
        if sp:  # the final norm's output before the LM head; the embedding's output gradient
            c.add("all-gather", u, ("tensor",), 2 * m, adt)
    if z["fsdp"] > 1:  # the embedding's d-shard lookup is redistributed to batch shards, and back
        c.add("all-to-all", u, ("fsdp",), 2 * m, adt)


def analytic_report(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, *, platform: str | None = None
) -> CompileReport:
    """The report XLA would give for one pipeline stage; `platform` picks the lowering ("cpu": XLA:CPU
    conventions, to compare with CPU compiles; anything else: TPU/GPU conventions)."""
    lw = lowering_for(platform)
    sh = shape_of(cfg, workload, strategy)
    z, m, p = sh.sizes, sh.m, strategy.size("pipeline")
    tp, mats = z["tensor"], 3 if cfg.ffn_activation == "swiglu" else 2
    flash = uses_flash(cfg, workload)
    fwd = rec = core = 0.0
    elem = trans = act_elems = score_elems = 0.0
    drawn = DR.embedding_dropout(cfg, sh).drawn  # dropout mask elements drawn per microbatch
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        drawn += layers * DR.layer_dropout(cfg, strategy.remat, sh, flash).drawn
        parts = _layer_mm(cfg, moe, sh)
        fwd += layers * sum(parts.values())
        rec += layers * _recomputed(parts, strategy.remat)
        core += layers * _attention_core(cfg, workload, strategy.remat, sh, platform)
        scores = 0.0 if flash else sh.b * (cfg.heads / tp) * sh.s * sh.seq  # flash: inside its kernel
        width = _ffn_width(cfg, moe, tp)
        # Elementwise passes: forward, two backward, and the forward again in a checkpointed layer
        # (selective: the softmax only). Under sp the norms and residual adds see 1/tensor positions.
        passes = 3 + (1 if R.layer_checkpointed(strategy.remat) else 0)
        score_passes = 3 + (1 if any(R.core_recompute(strategy.remat)) else 0)
        per_res = ELEM_PER_RESIDUAL - ELEM_PER_NORM * (1 - sh.act.res / cfg.hidden)
        elem += layers * (
            passes * (per_res * sh.t * cfg.hidden + ELEM_PER_FFN * sh.t * width)
            + score_passes * ELEM_PER_SCORE * scores
        )
        trans += layers * (passes * sh.t * width + score_passes * scores)
        act_elems += layers * passes * sh.t * (4 * cfg.hidden + mats * width)
        score_elems += layers * score_passes * scores
    head = 2 * sh.t * cfg.hidden * cfg.vocab_size / tp
    matmul = 3 * (fwd + head) + rec + core
    logits = sh.t * sh.act.vocab
    params = sharded_params(cfg, strategy)
    local_params = sum(sp.local_elems * sp.count for sp in params)  # what the stage uses and updates
    gathered = sum(sp.local_elems * sp.count * (z["fsdp"] if "fsdp" in sp.axes else 1) for sp in params)
    elem += DR.RNG_OPS_PER_ELEMENT * drawn
    flops = m * (matmul + elem + ELEM_PER_LOGIT * logits) + OPT_FLOPS_PER_PARAM * local_params
    if lw is CPU_LOWERING:  # one fitted total: XLA:CPU's ops all run on the same cores anyway
        w_uses = 3 + (rec / fwd if fwd else 0.0)  # recomputed matmuls read their weights again
        tr = CPU_TRAFFIC
        nbytes = (
            m
            * (
                tr["act"] * act_elems
                + tr["score"] * score_elems
                + tr["logit"] * logits
                + tr["weight"] * w_uses * gathered
            )
            + tr["opt"] * local_params
            + m * DR.RNG_CPU_BYTES * drawn
        )
        matmul_bytes = 0.0
    else:
        matmul_bytes, memory_bound = _accelerator_traffic(
            cfg, workload, strategy, sh, local_params, gathered, platform
        )
        nbytes = matmul_bytes + memory_bound

    coll = _Coll(strategy)
    _weights_and_grads(cfg, strategy, workload, sh, lw, coll)
    _activations(cfg, strategy, workload, sh, lw, coll)
    mem = analytic_memory(cfg, workload, strategy, platform=platform)
    notes = [
        "analytic: closed-form estimate of one pipeline stage" if p > 1 else "analytic: closed-form estimate",
        f"lowering: {lw.name}",
    ]
    return CompileReport(
        outcome="ok",
        target="analytic",
        mesh=tuple((a, n) for a, n in strategy.mesh if a != "pipeline"),
        flops=flops,
        matmul_flops=m * matmul,
        bytes_accessed=nbytes,
        matmul_bytes=matmul_bytes,
        transcendentals=m * (trans + logits),
        collectives=coll.collectives(),
        memory=mem.as_stats(),
        notes=tuple(notes),
        lowering=lw.name,
    )

"""Closed-form CompileReport: what XLA would emit for one (model, workload, strategy), without compiling.

Microseconds per candidate, so the planner can rank thousands of layouts and compile only the best.
Everything is per device per step, for ONE pipeline stage (layers / pipeline; the embedding and the LM
head are both included, i.e. the stage is costed as the heaviest one). Shapes below: b rows per
device per microbatch = B / (data*fsdp*expert*microbatches), s = S / sequence positions, u = b*s*d.

Matmul FLOPs (the models' einsums, sharded as `default_rules` shards them): each weight matmul is
2 x tokens x (weight elements / its tensor and expert shards); weights without a tensor-sharded dim
(norms, MLA's wq_a/wkv_a, the MoE router) are computed redundantly on every tensor rank. XLA's
attention computes the full S x S score matrix (masked), 4 b (n/tp) s S h FLOPs per layer. MoE experts
process E x C slots per group (C = ceil(k S capacity_factor / E)), so expert FLOPs scale with capacity,
not k; their group dim is sharded by data*fsdp only (not sequence). Backward = 2 x forward; remat
"full" recomputes each layer's forward except the FFN's last matmul (its output only feeds the
residual add, so XLA drops it as dead code); "dots" saves matmul outputs (no matmul recompute);
"dots_nobatch" recomputes the attention-core dots.

Collectives, as XLA's SPMD partitioner emits them (studied on the tiny presets, 8 CPU devices; see
tests/test_analytic.py). Per microbatch unless noted:
- fsdp: every layer's fsdp-sharded weights all-gathered in forward AND again in backward (with or
  without remat); the LM head gathered once per step (hoisted out of the microbatch loop); the
  embedding is looked up on its d-shard and redistributed by an all-to-all of b*s*d (fwd and bwd),
  so its gradient needs no reduction. Gradients: a reduce-scatter per param over fsdp (XLA:CPU writes
  it as all-reduce + dynamic-slice, so the CPU lowering reports all-reduce of the full size).
- data / sequence / expert (for non-expert params) are replicas of each param: its gradient is
  all-reduced over them (after the fsdp scatter, at the scattered size), inside the microbatch loop.
- tensor (Megatron): one all-reduce of a partial sum per matmul that contracts a tensor-sharded dim.
  Forward: attention output, FFN output (MoE: routed y_e and the shared expert separately).
  Backward: the input gradient of each column-parallel matmul separately (GQA: q, k, v; MLA: the
  q_lora and kv_lora latents and the broadcast RoPE key; FFN: gate and up). Remat full recomputes the
  forward all-reduces whose results backward needs (attention output; MoE y_e). Vocab-parallel
  embedding lookup (fwd) and LM-head input gradient (bwd): one u each; cross-entropy: 3 small b*s.
- sequence: K and V all-gathered to full length per layer (forward, and again when remat recomputes),
  their gradients reduce-scattered (CPU: all-reduced) in backward.
- expert: all-to-all of the dispatched tokens b x E x C x d, dispatch and combine, forward and backward
  (and again under remat full); the router statistics of the load-balancing loss (B x S x E f32) are
  all-gathered over the batch axes once per forward pass.
Bytes per element follow the backend's lowering (`Lowering`): XLA:CPU promotes bf16 reductions to
f32 and gathers f32 master weights before the bf16 cast; TPU/GPU move bf16.

Non-matmul FLOPs and transcendentals are coarse per-element counts (constants below, fitted to XLA's
own HLO op counts on the tiny presets: op counts, not hardware constants); HBM bytes use the
lowering's traffic per element (see `Lowering`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.compile.hlo import Collective
from codesign.compile.report import CompileReport
from codesign.config import ModelConfig, Workload
from codesign.cost.memory import F32, analytic_memory, sharded_params, spmd_sizes
from codesign.sharding.strategy import Strategy

# Elementwise op counts (FLOPs per element), fitted to XLA's HLO op counts on the tiny presets.
OPT_FLOPS_PER_PARAM = 20  # AdamW + global-norm clipping
ELEM_PER_RESIDUAL = 40  # per token x d per layer per pass: norms, RoPE, residual adds, casts
ELEM_PER_FFN = 6  # per token x ffn width: SiLU/GELU and the gating product
ELEM_PER_SCORE = 8  # per attention score: scale, mask, max, sub, sum, div
ELEM_PER_LOGIT = 12  # per logit: log-softmax and its gradient


@dataclass(frozen=True)
class Lowering:
    """How a backend lowers the SPMD program's collectives (bytes per element and the scatter op)."""

    name: str
    act_bytes: int  # activation collectives (bf16 compute)
    weight_bytes: int  # FSDP weight all-gathers (f32 master weights)
    grad_bytes: int  # gradient reductions (f32 params)
    scatter_kind: str  # how a reduce-scatter appears in the compiled module
    # HBM traffic per element (reads + writes), which depends on how well the backend fuses:
    act_traffic: float  # per activation element per pass (matmul input/output, elementwise chains)
    weight_traffic: float  # per weight element per use (read f32, write and read the bf16 cast)
    opt_traffic: float  # per local param for AdamW + global-norm clipping
    score_traffic: float  # per attention score per pass (XLA attention materializes b x h x s x S)

    def dtype(self, nbytes: int) -> str:
        return "f32" if nbytes == 4 else "bf16"


# Measured on XLA:CPU (jax 0.10.2): bf16 all-reduces are promoted to f32; weights are gathered before
# the bf16 convert; reduce-scatter is all-reduce + dynamic-slice.
# Its traffic constants are a least-squares fit to the HLO walk's bytes on the tiny presets (19
# layouts, all within 0.8-1.2x): XLA:CPU fuses little, so the AdamW update alone moves ~85 B/param.
CPU_LOWERING = Lowering("cpu", 4, 4, 4, "all-reduce", act_traffic=36, weight_traffic=13, opt_traffic=84,
                        score_traffic=56)
# libtpu 0.0.52 (v5e:2x4, tiny-dense) moves the bf16 convert before the FSDP all-gathers and reduces
# gradients in bf16; GPU is assumed to do the same (native bf16 collectives, NCCL reduce-scatter).
# Traffic from first principles for fused kernels (bytes): AdamW reads param, mu, nu, grad and writes
# param, mu, nu (7 x 4) plus the clipping norm's read (4); a weight use reads f32 and writes + reads its
# bf16 cast (8); a bf16 activation is written once and read about three times (8); a score is written
# in f32, read by the softmax, written as bf16 probs and read by the PV matmul (4 + 4 + 2 + 2).
ACCEL_LOWERING = Lowering("accelerator", 2, 2, 2, "reduce-scatter", act_traffic=8, weight_traffic=8,
                          opt_traffic=32, score_traffic=12)


def lowering_for(platform: str | None) -> Lowering:
    return CPU_LOWERING if platform == "cpu" else ACCEL_LOWERING


@dataclass(frozen=True)
class Shape:
    """Per-device sizes of one strategy: what every formula above is written in."""

    b: float  # rows per device per microbatch
    s: float  # positions per device
    seq: int  # full sequence length
    m: int  # microbatches
    sizes: dict
    cap: int  # MoE expert capacity per group

    @property
    def t(self) -> float:
        return self.b * self.s


def shape_of(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> Shape:
    sizes = spmd_sizes(strategy)
    m = strategy.microbatches
    b = workload.global_batch / (sizes["data"] * sizes["fsdp"] * sizes["expert"] * m)
    cap = max(1, math.ceil(cfg.experts_per_token * workload.seq_len * cfg.capacity_factor
                           / cfg.n_routed_experts)) if cfg.is_moe else 0
    return Shape(b, workload.seq_len / sizes["sequence"], workload.seq_len, m, sizes, cap)


def moe_slots(cfg: ModelConfig, sh: Shape) -> float:
    """Dispatched token slots per device per microbatch: (E/expert) x (B/(data*fsdp*m)) x C."""
    z = sh.sizes
    return (cfg.n_routed_experts / z["expert"]) * sh.b * z["expert"] * sh.cap


def _layer_mm(cfg: ModelConfig, moe: bool, sh: Shape) -> tuple[float, float]:
    """(forward matmul FLOPs, FLOPs of the matmuls remat never recomputes) of one layer, per microbatch."""
    tp = sh.sizes["tensor"]
    d, n, t = cfg.hidden, cfg.heads, sh.t
    qk, v = cfg.qk_head_dim, cfg.attn_v_head_dim
    if cfg.attention == "mla":
        rope, r = cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank * n * qk / tp) if cfg.q_lora_rank else d * n * qk / tp
        attn = q + d * (r + rope) + r * n * (cfg.qk_nope_head_dim + v) / tp + n * v * d / tp
    else:
        attn = d * (n + 2 * cfg.kv_heads) * qk / tp + n * v * d / tp
    fl = 2 * t * attn + 2 * sh.b * (n / tp) * sh.s * sh.seq * (qk + v)
    mats = 3 if cfg.ffn_activation == "swiglu" else 2
    if not moe:
        return fl + 2 * t * mats * d * cfg.mlp_dim / tp, 2 * t * cfg.mlp_dim / tp * d
    e, k = cfg.n_routed_experts, cfg.experts_per_token
    shared = cfg.moe_mlp_dim * cfg.n_shared_experts / tp
    fl += 2 * t * d * e + 2 * moe_slots(cfg, sh) * 3 * d * cfg.moe_mlp_dim / tp  # router, routed experts
    fl += 2 * t * k * d + 2 * t * mats * d * shared  # combine einsum, shared expert
    return fl, 2 * t * k * d + 2 * t * shared * d


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
        return tuple(Collective(kind=k, bytes=b, group_size=g, mesh_axes=ax, count=max(1, round(c)), dtype=dt)
                     for (k, b, g, ax, dt), c in sorted(self.rows.items(), key=lambda kv: kv[0][:2]))


def _weights_and_grads(cfg, strategy, sh: Shape, lw: Lowering, c: _Coll) -> None:
    z, m = sh.sizes, sh.m
    wdt, gdt = lw.dtype(lw.weight_bytes), lw.dtype(lw.grad_bytes)
    batchlike = ("data", "fsdp", "expert", "sequence")
    combined: dict[tuple, float] = {}
    for sp in sharded_params(cfg, strategy):
        name, full = sp.group.name, sp.local_elems
        per_step = sp.count
        fsdp = "fsdp" in sp.axes
        if fsdp:
            gathered = full * z["fsdp"] * lw.weight_bytes
            if sp.group.where != "global":
                c.add("all-gather", gathered, ("fsdp",), 2 * per_step * m, wdt)  # forward + backward
            elif name != "embed":
                c.add("all-gather", gathered, ("fsdp",), 1, wdt)  # hoisted out of the microbatch loop
        # Gradient reductions: over every batch-like axis that does not shard this param; expert
        # weights receive their tokens by all-to-all, so the expert axis is not a replica for them.
        replicas = [a for a in batchlike if z[a] > 1 and a not in sp.axes]
        if name.startswith("moe.w_"):
            replicas = [a for a in replicas if a != "expert"]
        if fsdp and name != "embed":
            c.add(lw.scatter_kind, full * z["fsdp"] * lw.grad_bytes, ("fsdp",), per_step * m, gdt)
        axes = tuple(a for a in replicas if not (fsdp and a == "fsdp"))
        combined[(axes, per_step * m)] = combined.get((axes, per_step * m), 0.0) + full * lw.grad_bytes
    # XLA's all-reduce combiner merges the gradient reductions that run together (one layer's, or
    # the globals') into one collective: one latency per group, not one per param.
    for (axes, count), nbytes in combined.items():
        c.add("all-reduce", nbytes, axes, count, gdt)


def _activations(cfg, strategy, workload, sh: Shape, lw: Lowering, c: _Coll) -> None:
    z, m = sh.sizes, sh.m
    ab, adt = lw.act_bytes, lw.dtype(lw.act_bytes)
    p = strategy.size("pipeline")
    u = sh.t * cfg.hidden * ab
    full = strategy.remat == "full"
    swiglu = 2 if cfg.ffn_activation == "swiglu" else 1
    if cfg.attention == "mla":
        lat = (cfg.q_lora_rank or cfg.hidden) + cfg.kv_lora_rank + cfg.qk_rope_head_dim
        attn_bwd = [sh.t * lat * ab]
    else:
        attn_bwd = [u] * 3
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        n = layers * m
        if z["tensor"] > 1:
            ue = moe_slots(cfg, sh) * cfg.hidden * ab if moe else 0.0
            fwd = [u, ue] + ([u] if (not moe or cfg.n_shared_experts) else [])
            recompute = [u, ue] if full else []
            # Routed experts are always gated (gate and up); the dense/shared FFN follows the config.
            ffn_bwd = ([ue] * 2 if moe else []) + ([u] * swiglu if (not moe or cfg.n_shared_experts) else [])
            for x in fwd + recompute + attn_bwd + ffn_bwd:
                c.add("all-reduce", x, ("tensor",), n, adt)
        if z["sequence"] > 1:
            kvh = cfg.heads if cfg.attention == "mla" else cfg.kv_heads
            for width in (cfg.qk_head_dim, cfg.attn_v_head_dim):
                kv = sh.b * sh.seq * kvh / z["tensor"] * width * ab
                c.add("all-gather", kv, ("sequence",), n * (2 if full else 1), adt)
                c.add(lw.scatter_kind, kv, ("sequence",), n, adt)
        if moe:
            if z["expert"] > 1:
                c.add("all-to-all", moe_slots(cfg, sh) * cfg.hidden * ab, ("expert",), n * (6 if full else 4), adt)
    if z["tensor"] > 1:  # vocab-parallel embedding (fwd), LM-head input grad (bwd), cross-entropy stats
        c.add("all-reduce", u, ("tensor",), 2 * m, adt)
        c.add("all-reduce", sh.t * F32, ("tensor",), 3 * m, "f32")
    if z["fsdp"] > 1:  # the embedding's d-shard lookup is redistributed to batch shards, and back
        c.add("all-to-all", u, ("fsdp",), 2 * m, adt)


def analytic_report(cfg: ModelConfig, workload: Workload, strategy: Strategy, *,
                    platform: str | None = None) -> CompileReport:
    """The report XLA would give for one pipeline stage; `platform` picks the lowering ("cpu": XLA:CPU
    conventions, to compare with CPU compiles; anything else: TPU/GPU conventions)."""
    lw = lowering_for(platform)
    sh = shape_of(cfg, workload, strategy)
    z, m, p = sh.sizes, sh.m, strategy.size("pipeline")
    tp, mats = z["tensor"], 3 if cfg.ffn_activation == "swiglu" else 2
    fwd = rec = 0.0
    elem = trans = act_elems = score_elems = 0.0
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        f, skip = _layer_mm(cfg, moe, sh)
        fwd += layers * f
        scores = sh.b * (cfg.heads / tp) * sh.s * sh.seq
        if strategy.remat == "full":
            rec += layers * (f - skip)
        elif strategy.remat == "dots_nobatch":
            rec += layers * 2 * scores * (cfg.qk_head_dim + cfg.attn_v_head_dim)
        width = (cfg.moe_mlp_dim * cfg.n_shared_experts + cfg.experts_per_token * cfg.moe_mlp_dim * cfg.capacity_factor
                 if moe else cfg.mlp_dim) / tp
        passes = 3 + (1 if strategy.remat != "none" else 0)
        elem += layers * passes * (ELEM_PER_RESIDUAL * sh.t * cfg.hidden + ELEM_PER_FFN * sh.t * width
                                   + ELEM_PER_SCORE * scores)
        trans += layers * passes * (scores + sh.t * width)
        act_elems += layers * passes * sh.t * (4 * cfg.hidden + mats * width)
        score_elems += layers * passes * scores
    head = 2 * sh.t * cfg.hidden * cfg.vocab_size / tp
    matmul = 3 * (fwd + head) + rec
    logits = sh.t * cfg.vocab_size / tp
    local_params = sum(sp.local_elems * sp.count for sp in sharded_params(cfg, strategy))
    gathered = sum(sp.local_elems * sp.count * (z["fsdp"] if "fsdp" in sp.axes else 1)
                   for sp in sharded_params(cfg, strategy))
    flops = m * (matmul + elem + ELEM_PER_LOGIT * logits) + OPT_FLOPS_PER_PARAM * local_params
    w_uses = 4 if strategy.remat == "full" else 3
    nbytes = (m * (lw.act_traffic * act_elems + lw.score_traffic * score_elems + 6 * F32 * logits
                   + lw.weight_traffic * w_uses * gathered) + lw.opt_traffic * local_params)

    coll = _Coll(strategy)
    _weights_and_grads(cfg, strategy, sh, lw, coll)
    _activations(cfg, strategy, workload, sh, lw, coll)
    mem = analytic_memory(cfg, workload, strategy)
    notes = ["analytic: closed-form estimate of one pipeline stage" if p > 1 else "analytic: closed-form estimate",
             f"lowering: {lw.name}"]
    return CompileReport(outcome="ok", target="analytic", mesh=tuple((a, n) for a, n in strategy.mesh if a != "pipeline"),
                         flops=flops, matmul_flops=m * matmul, bytes_accessed=nbytes,
                         transcendentals=m * (trans + logits), collectives=coll.collectives(),
                         memory=mem.as_stats(), notes=tuple(notes))


def estimate_analytic(cfg: ModelConfig, workload: Workload, strategy: Strategy, hardware):
    """`estimate_from_report` on the closed-form report, with the hardware platform's lowering."""
    from codesign.cost.estimate import estimate_from_report  # estimate imports this module

    return estimate_from_report(cfg, workload, strategy, hardware,
                                analytic_report(cfg, workload, strategy, platform=hardware.platform))

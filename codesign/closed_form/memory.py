"""Closed-form memory per device, read from the param table in `params.py`. Every term is named in
`MemoryEstimate`, so a report can say which one does not fit.

Memory formula (bytes per device; P = local param elements = sum of elems / shards over all params):
    params     4 P  (float32 weights; `Workload.param_dtype`)
    grads      4 P  (the grads of the params, in their dtype; zero=2: sharded like the moments)
    grad_accumulator  4 P with microbatches > 1 (the accumulator beside the microbatch's own grads,
               in `Workload.update_dtype`: f32 with a master copy, for one microbatch too)
    optimizer  8 P  (AdamW mu and nu in `Workload.update_dtype`; zero>=1: sharded over data, and an
               MoE's non-expert params' over expert too: `params.zero_shards`)
    master     4 P with `Workload.master_dtype` (Megatron-LM's fp32 main params beside bf16 weights),
               sharded like the moments
    gathered   2 x one layer's FSDP-gathered weights (the layer in use and the prefetched next one)
    saved_activations: what every layer keeps for its backward, per microbatch of
               b = B/(data*fsdp*expert*microbatches) rows and s = S/sequence positions, bf16 (2 bytes),
               each activation as split by the strategy's rules (`params.act_layout`: the defaults
               divide tensor-sharded widths by tensor, and under sequence parallelism (sp=1) the
               residual stream and the norms' outputs (width d) by tensor too; a rules file may split
               them otherwise):
      none:      all of the layer's intermediates (layer_bytes below)
      selective: the same without the attention scores and probabilities (Megatron's selective
                 recompute: the core is recomputed from the kept q, k, v)
      full:      the layer's input (the residual checkpoint b*s*d)
      dots / dots_nobatch: the input + every matmul output (dots_nobatch: not the attention score/PV
                 dots or the routed experts', which have batch dims)
      named (minimal, save_qkv_proj, save_dot_except_mlp(wi), offload): the input + the projections
                 the policy names that backward uses (`remat.py`); `offload` keeps them in pinned host
                 memory instead (`host_offloaded`, not part of the device total)
    pipeline_in_flight: a device holds L/p layers (V chunks of L/(pV)) and its schedule keeps more
               microbatches' saved activations than the one above in flight (`pipeline.py`, as
               executed: gpipe m + (p-1)/V, 1f1b min(2p - 1, m), interleaved min(2pV - 1, mV)/V,
               dualpipe p + 1): the extra ones; and the pipeline's input buffers where the input
               of all m microbatches is computed before the loop (gpipe, or an MoE model's dense
               prefix): that input and its gradient, 2 m x the layer input. An MoE model's dense
               prefix runs before the loop on the whole batch split over the p stages, so it keeps
               its layers' saved activations for m / p microbatches throughout, and its backward's
               transient is m / p microbatches' (`params.prefix_split`).
               DualPipe also holds two stages' params, grads and optimizer state (2x the stage
               layers; the embedding, head and a dense prefix once).
    layer_transient: one layer's intermediates live while its backward runs (recomputed in a
               checkpointed layer; none for remat none or selective), its attention scores apart:
    attention_workspace: XLA attention's f32 scores and bf16 probabilities of that layer (recomputed),
               or under selective the recomputed ones and their gradients; none for remat none (its
               scores are saved activations). With flash attention (`Workload.flash`) no scores exist:
               the kernel's f32 row statistics in the layout it writes them
               (`models.attention.stats_bytes`: splash 512 B per query row per head, cuDNN 8 B).
    logits     b*s*V/tensor x 8 bytes: the float32 logits and their gradient (the cross-entropy peak).
    total      params + grads (+ accumulator) + optimizer + saved_activations + the larger of logits
               and one layer's backward (gathered + layer_transient + attention_workspace): the loss
               is computed and its logits freed before the first layer's backward starts.
layer_bytes counts per token: the block input and its two norms (3d), q/k/v before and after RoPE
(2x(n+2k)h / tensor), the attention output (n h / tensor) and o-projection (d), attention scores in
f32 and probs in bf16 ((n / tensor) x S x 6 bytes, XLA's attention materializes them), and the FFN's
gate/up/activation (3f / tensor) and down output (d). MoE layers add the dispatched buffers
(E x C tokens per group of S: x, gate, up, act, y at widths d, f, f, f, d; the expert dim is
sharded by expert and the FFN width by tensor). Under sp the d-wide terms are the sequence-sharded
d/tensor, except the norms' gathered outputs where backward does not gather them again (remat none;
an MoE block's input under selective).
"""

from __future__ import annotations

from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.closed_form import dropout as DR
from codesign.closed_form import remat as R
from codesign.closed_form.params import (
    Shape,
    moe_slots,
    prefix_split,
    replica_axes,
    shape_of,
    sharded_params,
    spmd_sizes,
    zero_level,
    zero_shards,
)
from codesign.closed_form.pipeline import in_flight_microbatches, param_copies
from codesign.config import ModelConfig, Workload, dtype_bytes
from codesign.models.attention import flash_blocks, kernel_for, stats_bytes
from codesign.report import MemoryStats
from codesign.sharding.strategy import Strategy

ACT_BYTES = 2  # bf16 activations
F32 = 4
SCORE_BYTES = 6  # per attention score in XLA's forward: f32 scores, bf16 probabilities
SOFTMAX_BWD_BYTES = 10  # the softmax's backward: its f32 output, the bf16 dP and the f32 dS


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, one field per term (`to_json` names them in a report's breakdown)."""

    params: float
    grads: float  # the step's gradients (one microbatch's)
    optimizer: float
    gathered: float  # FSDP: one layer's weights all-gathered, current and prefetched
    saved_activations: float
    layer_transient: float  # one layer's recomputed intermediates while its backward runs
    logits: float
    grad_accumulator: float = 0.0  # microbatches > 1: the accumulated gradients beside a microbatch's
    attention_workspace: float = 0.0  # the attention scores (XLA) or kernel statistics (flash) in backward
    host_offloaded: float = 0.0  # remat=offload: saved activations in pinned host memory (not in total)
    pipeline_in_flight: float = 0.0  # saved activations of the pipeline's other microbatches in flight
    master: float = 0.0  # the optimizer's master copy of the params (`Workload.master_dtype`)

    @property
    def activations(self) -> float:
        return (
            self.saved_activations + self.pipeline_in_flight + self.layer_transient + self.attention_workspace
        )

    @property
    def layer_phase(self) -> float:
        """What one layer's backward adds to the saved activations: its gathered weights, its
        recomputed intermediates and its attention scores."""
        return self.gathered + self.layer_transient + self.attention_workspace

    @property
    def total(self) -> float:
        """The peak: the state, the gradients and every saved activation, plus the larger of the two
        phases that never overlap: the loss (the f32 logits and their gradient, freed by the LM head's
        backward before the layers' backward starts) and one layer's backward."""
        return (
            self.params
            + self.grads
            + self.grad_accumulator
            + self.optimizer
            + self.master
            + self.saved_activations
            + self.pipeline_in_flight
            + max(self.logits, self.layer_phase)
        )

    def as_stats(self, capacity: int = 0) -> MemoryStats:
        """MemoryStats-shaped: state (params + optimizer) is argument/output (donated, aliased)."""
        state = int(self.params + self.optimizer + self.master)
        temp = int(self.total) - state
        return MemoryStats(
            argument=state, output=state, alias=state, temp=temp, peak=int(self.total), capacity=capacity
        )

    def to_json(self) -> dict[str, float]:
        return {
            "params": self.params,
            "grads": self.grads,
            "grad_accumulator": self.grad_accumulator,
            "optimizer": self.optimizer,
            "master": self.master,
            "gathered": self.gathered,
            "saved_activations": self.saved_activations,
            "attention_workspace": self.attention_workspace,
            "pipeline_in_flight": self.pipeline_in_flight,
            "layer_transient": self.layer_transient,
            "activations": self.activations,
            "logits": self.logits,
            "layer_phase": self.layer_phase,
            "host_offloaded": self.host_offloaded,
            "total": self.total,
        }


@dataclass(frozen=True)
class _LayerBytes:
    """One layer's activations for b rows x s positions, bytes per device."""

    everything: float  # all intermediates (what remat none keeps)
    scores: float  # f32 scores + bf16 probabilities of XLA attention
    attention: float  # the attention block's intermediates other than its scores
    parts: dict  # saved output bytes of each matmul part (remat.PARTS)
    core_dots: float  # the attention score (f32) and PV outputs: what dots keeps beyond the parts
    layer_input: float


def _layer_bytes(cfg: ModelConfig, moe: bool, sh: Shape, remat: str, flash: bool = False) -> _LayerBytes:
    tp, act = sh.sizes["tensor"], sh.act
    d, t, seq = cfg.hidden, sh.t, sh.seq
    res = act.res  # the residual stream (sequence-sharded under sp)
    # The two norms' outputs as kept for backward: residual-sharded where backward gathers them again,
    # else the gathered copies the blocks read.
    rg = R.regathered(remat, moe) if act.res_tensor else 0
    norms = rg * res + (2 - rg) * act.gathered
    qk, v = cfg.qk_head_dim, cfg.attn_v_head_dim
    n, kvh = act.heads, act.kv_heads
    qkv = n * qk + kvh * qk + kvh * v
    if flash:  # the kernel's logsumexp per query per head; the kernel is no dot for `dots` to save
        scores, core_dots = t * n * F32, 0.0
    else:
        scores = t * n * seq * SCORE_BYTES  # f32 scores + bf16 probs per query position
        core_dots = t * (n * seq * F32 + n * v * ACT_BYTES)
    attn_all = t * (res + norms + 2 * qkv + n * v + res) * ACT_BYTES + scores
    parts = {"qkv": t * qkv * ACT_BYTES, "out": t * res * ACT_BYTES}
    gates = 2 if cfg.ffn_activation == "swiglu" else 1
    if not moe:
        f = act.ffn
        parts.update(wi=t * gates * f * ACT_BYTES, wo=t * res * ACT_BYTES)
        everything = attn_all + t * (3 * f + res) * ACT_BYTES
        return _LayerBytes(everything, scores, attn_all - scores, parts, core_dots, t * res * ACT_BYTES)
    f = cfg.moe_mlp_dim / tp
    slots = moe_slots(cfg, sh)  # dispatched token slots on this device
    sf = f * cfg.n_shared_experts
    ffn_all = slots * (2 * d + 3 * f) * ACT_BYTES + t * (cfg.experts_per_token * d + 3 * sf + res) * ACT_BYTES
    parts.update(
        router=t * cfg.n_routed_experts * F32,
        routed_wi=slots * 2 * f * ACT_BYTES,
        routed_wo=slots * d * ACT_BYTES,
        shared_wi=t * gates * sf * ACT_BYTES,
        shared_wo=t * res * ACT_BYTES if sf else 0.0,
    )
    return _LayerBytes(attn_all + ffn_all, scores, attn_all - scores, parts, core_dots, t * res * ACT_BYTES)


def _saved(lb: _LayerBytes, remat: str) -> float:
    """What one layer keeps for backward under `remat` (device and host together)."""
    if remat == "none":
        return lb.everything
    if remat == "selective":
        return lb.everything - lb.scores
    kept = sum(lb.parts.get(p, 0.0) for p in R.saved_parts(remat) & R.NEEDED)
    if remat == "dots":
        kept += lb.core_dots
    return lb.layer_input + kept


def analytic_memory(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, *, platform: str | None = None
) -> MemoryEstimate:
    """Memory per device (module docstring); `platform` picks the flash kernel whose workspace counts
    (`closed_form.program.flash_kernel`; default an accelerator's)."""
    sizes = spmd_sizes(strategy)
    params = sharded_params(cfg, strategy)
    m, p = strategy.microbatches, strategy.size("pipeline")
    # DualPipe holds stage i and stage p - 1 - i: two copies of a stage's state. The embedding and
    # head (and an MoE's dense prefix, which every device holds) are not stage layers: one copy.
    stack = ("moe",) if prefix_split(cfg, p) else ("dense", "moe")

    def copies(sp) -> int:
        return param_copies(strategy.schedule) if sp.group.where in stack else 1

    local = sum(sp.local_elems * sp.count * copies(sp) for sp in params)
    pbytes = workload.param_bytes
    # ZeRO over the batch axes that replicate each param (data; expert for the non-expert params):
    # moments (1) and, where the step reduces over data itself, the gradient accumulator (2).
    zero = zero_level(cfg, strategy)
    zero_local = sum(sp.local_elems * sp.count * copies(sp) / zero_shards(cfg, strategy, sp) for sp in params)
    scattered = zero == 2 and "data" in replica_axes(cfg, strategy)
    grads = (zero_local if scattered else local) * pbytes
    # The accumulator, in what the optimizer updates (f32 with a master copy, which also needs it for
    # one microbatch: the gradients are cast to it before the reduction and the update).
    accumulator = (zero_local if scattered else local) * workload.update_bytes
    if m == 1 and workload.master_dtype is None:
        accumulator = 0.0
    # One layer's weights gathered, twice (current + prefetched): over fsdp, and an MoE prefix's
    # over pipeline (`params.prefix_split`).
    per_layer: dict[str, float] = {}
    table = 0.0  # the prefix's embedding gathered over the stages for its lookup: one table, once
    for sp in params:
        widen = (sizes["fsdp"] if "fsdp" in sp.axes else 1) * (p if "pipeline" in sp.axes else 1)
        if sp.group.where != "global" and widen > 1:
            per_layer[sp.group.where] = per_layer.get(sp.group.where, 0.0) + sp.local_elems * widen
        elif sp.group.where == "global" and "pipeline" in sp.axes:
            table += sp.local_elems * widen
    gathered = max(2 * max(per_layer.values(), default=0.0), table) * pbytes

    sh = shape_of(cfg, workload, strategy)
    in_flight = in_flight_microbatches(strategy.schedule, p, strategy.stages_per_device, m)
    remat = strategy.remat
    saved = host = live = workspace = buffers = inputs = 0.0
    prefix = cfg.moe_layers > 0 and cfg.dense_layers > 0  # runs before the pipeline, whole batch
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        lb = _layer_bytes(cfg, moe, sh, remat, workload.flash)
        if p > 1 and not inputs and (prefix or strategy.schedule not in ("1f1b", "interleaved")):
            # The pipeline's input for every microbatch and its gradient wait outside the loop (1F1B
            # looks a dense model's tokens up per microbatch in the loop instead, `pipeline_1f1b.Source`).
            inputs = 2 * m * lb.layer_input
            buffers += inputs
        keep = _saved(lb, remat) + DR.layer_dropout(cfg, remat, sh, workload.flash).saved_bytes
        if R.offloaded(remat):  # the named outputs live in host memory; the layer input stays on device
            host += layers * (keep - lb.layer_input)
            keep = lb.layer_input
        # One layer's backward runs on a microbatch, except the prefix's: it runs on the whole batch
        # (split over the stages) after the loop, m / p microbatches at once.
        batch = 1.0
        if not moe and prefix_split(cfg, p):
            # Its forward ran before the loop, so its layers keep their saved activations for all
            # m / p microbatches throughout, not a microbatch's in flight.
            batch = m / p
            buffers += cfg.dense_layers * keep * batch
        else:
            saved += layers * keep
        if R.layer_checkpointed(remat):  # the recomputed layer, its attention scores apart
            # Backward runs the FFN's backward with the whole recomputed layer live (scores as f32
            # softmax output + bf16 probabilities, 6 bytes each), then the softmax's: the f32 output,
            # the bf16 dP and the f32 dS (10 bytes per score) with only the attention block's
            # intermediates left. The larger of the two is the layer's peak.
            softmax_bwd = lb.scores * SOFTMAX_BWD_BYTES / SCORE_BYTES
            if lb.attention + softmax_bwd > lb.everything:
                live, workspace = max(live, batch * lb.attention), max(workspace, batch * softmax_bwd)
            else:
                live = max(live, batch * (lb.everything - lb.scores))
                workspace = max(workspace, batch * lb.scores)
        elif remat == "selective":  # the recomputed scores and probabilities, and their gradients
            workspace = max(
                workspace, 2 * batch * lb.scores
            )  # (dP in bf16, dS in f32: 6 more bytes per score)
    # The embedding's dropout mask: kept for each microbatch unpipelined, for all m when the input is
    # computed before the pipeline, and not at all when 1F1B looks tokens up in its loop (its backward
    # redraws the mask).
    embedding_mask = DR.embedding_dropout(cfg, sh).saved_bytes
    if p <= 1:
        saved += embedding_mask
    elif buffers:
        buffers += m * embedding_mask
    # Saved activations of every microbatch in flight; one layer's backward runs at a time.
    logits = sh.t * sh.act.vocab * 2 * F32
    if workload.flash:  # the kernel's statistics in the layout it writes them, not the bare logsumexp
        kernel = kernel_for(workload.attention, platform or "tpu")
        kv_block = flash_blocks(kernel, int(sh.s), workload.seq_len)[1]
        workspace = max(workspace, sh.t * sh.act.heads * stats_bytes(kernel, kv_block))
    return MemoryEstimate(
        params=local * pbytes,
        grads=grads,
        grad_accumulator=accumulator,
        optimizer=2 * zero_local * dtype_bytes(workload.optimizer_state_dtype),
        master=zero_local * workload.update_bytes if workload.master_dtype else 0.0,
        gathered=gathered,
        saved_activations=saved,
        layer_transient=live,
        attention_workspace=workspace,
        logits=logits,
        host_offloaded=host * in_flight,
        pipeline_in_flight=saved * (in_flight - 1) + buffers,
    )

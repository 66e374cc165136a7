"""Closed-form memory per device, read from the param table in `params.py`. Every term is named in
`MemoryEstimate`, so a report can say which one does not fit.

Memory formula (bytes per device; P = local param elements = sum of elems / shards over all params):
    params     4 P  (float32 master weights; `Workload.param_dtype`)
    grads      4 P  (float32: the grads of f32 params), x2 with microbatches > 1 (the accumulator and
                    the microbatch's own grads are live together)
    optimizer  8 P  (AdamW mu and nu in float32)
    gathered   2 x one layer's FSDP-gathered weights (the layer in use and the prefetched next one)
    saved_activations: what every layer keeps for its backward, per microbatch of
               b = B/(data*fsdp*expert*microbatches) rows and s = S/sequence positions, bf16 (2 bytes),
               tensor-sharded widths divided by tensor, and under sequence parallelism (sp=1) the
               residual stream and the norms' outputs (width d) divided by tensor too:
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
               microbatches' saved activations than the one above in flight (`pipeline.py`: gpipe m,
               1f1b min(m, p), interleaved p(1 + (p-1)/(pV)), dualpipe p + 1): the extra ones.
               DualPipe also holds two stages' params, grads and optimizer state (2x).
    layer_transient: one layer's intermediates live while its backward runs (recomputed), or under
               selective its recomputed scores and their gradients; none for remat none.
    logits     b*s*V/tensor x 8 bytes: the float32 logits and their gradient (the cross-entropy peak).
layer_bytes counts per token: the block input and its two norms (3d), q/k/v before and after RoPE
(2x(n+2k)h / tensor), the attention output (n h / tensor) and o-projection (d), attention scores in
f32 and probs in bf16 ((n / tensor) x S x 6 bytes, XLA's attention materializes them), and the FFN's
gate/up/activation (3f / tensor) and down output (d). MoE layers add the dispatched buffers
(`params.moe_slots` slots on this device after the all-to-all, E x C per routing group of the rows
the expert group holds: x, gate, up, act, y at widths d, f, f, f, d; the FFN width sharded by tensor). Under sp the d-wide terms are the sequence-sharded
d/tensor, except the norms' gathered outputs where backward does not gather them again (remat none;
an MoE block's input under selective).
"""

from __future__ import annotations

from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.closed_form import remat as R
from codesign.closed_form.params import moe_slots, shape_of, sharded_params, sp_active, spmd_sizes, zero_level
from codesign.closed_form.pipeline import in_flight_microbatches, param_copies
from codesign.config import ModelConfig, Workload, dtype_bytes
from codesign.report import MemoryStats
from codesign.sharding.strategy import Strategy

ACT_BYTES = 2  # bf16 activations
F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    gathered: float
    saved_activations: float
    layer_transient: float
    logits: float
    host_offloaded: float = 0.0  # remat=offload: saved activations in pinned host memory (not in total)
    pipeline_in_flight: float = 0.0  # saved activations of the pipeline's other microbatches in flight

    @property
    def activations(self) -> float:
        return self.saved_activations + self.pipeline_in_flight + self.layer_transient

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.logits

    def as_stats(self, capacity: int = 0) -> MemoryStats:
        """MemoryStats-shaped: state (params + optimizer) is argument/output (donated, aliased)."""
        state = int(self.params + self.optimizer)
        temp = int(self.grads + self.gathered + self.activations + self.logits)
        return MemoryStats(
            argument=state, output=state, alias=state, temp=temp, peak=int(self.total), capacity=capacity
        )

    def to_json(self) -> dict[str, float]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "gathered": self.gathered,
            "saved_activations": self.saved_activations,
            "pipeline_in_flight": self.pipeline_in_flight,
            "layer_transient": self.layer_transient,
            "activations": self.activations,
            "logits": self.logits,
            "host_offloaded": self.host_offloaded,
            "total": self.total,
        }


@dataclass(frozen=True)
class _LayerBytes:
    """One layer's activations for b rows x s positions, bytes per device."""

    everything: float  # all intermediates (what remat none keeps)
    scores: float  # f32 scores + bf16 probabilities of XLA attention
    parts: dict  # saved output bytes of each matmul part (remat.PARTS)
    core_dots: float  # the attention score (f32) and PV outputs: what dots keeps beyond the parts
    layer_input: float


def _layer_bytes(
    cfg: ModelConfig,
    moe: bool,
    b: float,
    s: float,
    seq: int,
    sizes: dict[str, int],
    sp: bool,
    remat: str,
    slots: float = 0.0,
) -> _LayerBytes:
    """`slots`: the MoE layer's dispatched token slots on this device (`params.moe_slots`)."""
    tp = sizes["tensor"]
    d, n = cfg.hidden, cfg.heads
    res = d / tp if sp else d  # the residual stream (sequence-sharded under sp)
    # The two norms' outputs as kept for backward: sequence-sharded where backward gathers them again,
    # else the gathered copies the blocks read.
    norms = (R.regathered(remat, moe) * res + (2 - R.regathered(remat, moe)) * d) if sp else 2 * d
    qk, v = cfg.qk_head_dim, cfg.attn_v_head_dim
    kvh = n if cfg.attention == "mla" else cfg.kv_heads
    t = b * s
    qkv = (n * qk + kvh * qk + kvh * v) / tp
    scores = t * (n / tp) * seq * 6  # f32 scores + bf16 probs per query position
    core_dots = t * ((n / tp) * seq * F32 + n * v / tp * ACT_BYTES)
    attn_all = t * (res + norms + 2 * qkv + n * v / tp + res) * ACT_BYTES + scores
    parts = {"qkv": t * qkv * ACT_BYTES, "out": t * res * ACT_BYTES}
    gates = 2 if cfg.ffn_activation == "swiglu" else 1
    if not moe:
        f = cfg.mlp_dim / tp
        parts.update(wi=t * gates * f * ACT_BYTES, wo=t * res * ACT_BYTES)
        everything = attn_all + t * (3 * f + res) * ACT_BYTES
        return _LayerBytes(everything, scores, parts, core_dots, t * res * ACT_BYTES)
    f = cfg.moe_mlp_dim / tp
    sf = f * cfg.n_shared_experts
    ffn_all = slots * (2 * d + 3 * f) * ACT_BYTES + t * (cfg.experts_per_token * d + 3 * sf + res) * ACT_BYTES
    parts.update(
        router=t * cfg.n_routed_experts * F32,
        routed_wi=slots * 2 * f * ACT_BYTES,
        routed_wo=slots * d * ACT_BYTES,
        shared_wi=t * gates * sf * ACT_BYTES,
        shared_wo=t * res * ACT_BYTES if sf else 0.0,
    )
    return _LayerBytes(attn_all + ffn_all, scores, parts, core_dots, t * res * ACT_BYTES)


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


def analytic_memory(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> MemoryEstimate:
    sizes = spmd_sizes(strategy)
    params = sharded_params(cfg, strategy)
    m, p = strategy.microbatches, strategy.size("pipeline")
    # DualPipe holds stage i and stage p - 1 - i: two copies of the state.
    local = sum(sp.local_elems * sp.count for sp in params) * param_copies(strategy.schedule)
    pbytes = workload.param_bytes
    # ZeRO over the data replicas: moments (1) and the gradient accumulator (2) sharded over data.
    zero = zero_level(cfg, strategy)
    zero_shards = sizes["data"] if zero else 1
    grads = local * pbytes * (2 if m > 1 else 1) / (zero_shards if zero == 2 else 1)
    gathered = 0.0
    if sizes["fsdp"] > 1:  # one layer's weights gathered, twice (current + prefetched)
        per_layer = {}
        for sp in params:
            if sp.group.where != "global" and "fsdp" in sp.axes:
                per_layer[sp.group.where] = (
                    per_layer.get(sp.group.where, 0.0) + sp.local_elems * sizes["fsdp"]
                )
        gathered = 2 * max(per_layer.values(), default=0.0) * pbytes

    b = workload.global_batch / (strategy.batch_shards * m)
    s = workload.seq_len / sizes["sequence"]
    in_flight = in_flight_microbatches(strategy.schedule, p, strategy.stages_per_device, m)
    slots = moe_slots(cfg, shape_of(cfg, workload, strategy)) if cfg.is_moe else 0.0
    remat = strategy.remat
    saved = host = live = 0.0
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        lb = _layer_bytes(
            cfg, moe, b, s, workload.seq_len, sizes, sp_active(workload, strategy), remat, slots
        )
        keep = _saved(lb, remat)
        if R.offloaded(remat):  # the named outputs live in host memory; the layer input stays on device
            host += layers * (keep - lb.layer_input)
            keep = lb.layer_input
        saved += layers * keep
        if R.layer_checkpointed(remat):
            live = max(live, lb.everything)
        elif remat == "selective":  # the recomputed scores and probabilities, and their gradients
            live = max(live, 2 * lb.scores)  # (dP in bf16, dS in f32: 6 more bytes per score)
    # Saved activations of every microbatch in flight; one layer's backward runs at a time.
    logits = b * s * cfg.vocab_size / sizes["tensor"] * 2 * F32
    return MemoryEstimate(
        params=local * pbytes,
        grads=grads,
        optimizer=2 * local * dtype_bytes(workload.optimizer_state_dtype) / zero_shards,
        gathered=gathered,
        saved_activations=saved,
        layer_transient=live,
        logits=logits,
        host_offloaded=host * in_flight,
        pipeline_in_flight=saved * (in_flight - 1),
    )

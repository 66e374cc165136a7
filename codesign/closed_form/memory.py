"""Closed-form memory per device, read from the param table in `params.py`.

Memory formula (bytes per device; P = local param elements = sum of elems / shards over all params):
    params     4 P  (float32 master weights; `Workload.param_dtype`)
    grads      4 P  (float32: the grads of f32 params), x2 with microbatches > 1 (the accumulator and
                    the microbatch's own grads are live together)
    optimizer  8 P  (AdamW mu and nu in float32)
    gathered   2 x one layer's FSDP-gathered weights (the layer in use and the prefetched next one)
    activations, per microbatch of b = B/(data*fsdp*expert*microbatches) rows and s = S/sequence positions,
               bf16 (2 bytes), tensor-sharded widths divided by tensor:
      remat none:  every layer keeps all its intermediates:  L x layer_bytes
      remat full:  every layer keeps its input (the residual checkpoint b*s*d) + one layer's
                   intermediates live while its backward runs:  L x 2bsd + layer_bytes
      remat dots / dots_nobatch: every layer keeps its matmul outputs (dots_nobatch: weight matmuls
                   only, no attention scores) + one layer's intermediates:  L x dot_bytes + layer_bytes
      pipeline: a stage holds L/p layers and, under a 1F1B schedule, min(microbatches, p) microbatches
                in flight.
    logits     b*s*V/tensor x 8 bytes: the float32 logits and their gradient (the cross-entropy peak).
layer_bytes counts per token: the block input and its two norms (3d), q/k/v before and after RoPE
(2x(n+2k)h / tensor), the attention output (n h / tensor) and o-projection (d), attention scores in
f32 and probs in bf16 ((n / tensor) x S x 6 bytes, XLA's attention materializes them), and the FFN's
gate/up/activation (3f / tensor) and down output (d). MoE layers add the dispatched buffers
(E x C tokens per group of S: x, gate, up, act, y at widths d, f, f, f, d; the expert dim is
sharded by expert and the FFN width by tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from codesign.arithmetic import stage_layers
from codesign.closed_form.params import sharded_params, spmd_sizes, zero_level
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
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.logits

    def as_stats(self, capacity: int = 0) -> MemoryStats:
        """MemoryStats-shaped: state (params + optimizer) is argument/output (donated, aliased)."""
        state = int(self.params + self.optimizer)
        temp = int(self.grads + self.gathered + self.activations + self.logits)
        return MemoryStats(argument=state, output=state, alias=state, temp=temp, peak=int(self.total),
                           capacity=capacity)

    def to_json(self) -> dict[str, float]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "gathered": self.gathered, "activations": self.activations, "logits": self.logits,
                "total": self.total}


def _layer_bytes(cfg: ModelConfig, moe: bool, b: float, s: float, seq: int, sizes: dict[str, int]) -> tuple[float, float]:
    """(all intermediates, matmul outputs only) of one layer for b rows x s positions, bytes per device."""
    tp, ep = sizes["tensor"], sizes["expert"]
    d, n = cfg.hidden, cfg.heads
    qk, v = cfg.qk_head_dim, cfg.attn_v_head_dim
    kvh = n if cfg.attention == "mla" else cfg.kv_heads
    t = b * s
    qkv = (n * qk + kvh * qk + kvh * v) / tp
    scores = (n / tp) * seq * 6  # f32 scores + bf16 probs per query position
    attn_all = t * ((3 * d + 2 * qkv + n * v / tp + d) * ACT_BYTES + scores)
    attn_dots = t * ((qkv + n * v / tp + d) * ACT_BYTES + (n / tp) * seq * F32)
    if not moe:
        f = cfg.mlp_dim / tp
        return attn_all + t * (3 * f + d) * ACT_BYTES, attn_dots + t * (2 * f + d) * ACT_BYTES
    f = cfg.moe_mlp_dim / tp
    cap = max(1, math.ceil(cfg.experts_per_token * seq * cfg.capacity_factor / cfg.n_routed_experts))
    slots = b * (cfg.n_routed_experts / ep) * cap  # dispatched token slots on this device (per expert shard)
    sf = f * cfg.n_shared_experts
    ffn_all = slots * (2 * d + 3 * f) * ACT_BYTES + t * (cfg.experts_per_token * d + 3 * sf + d) * ACT_BYTES
    ffn_dots = slots * (d + 2 * f) * ACT_BYTES + t * (2 * sf + d) * ACT_BYTES
    return attn_all + ffn_all, attn_dots + ffn_dots


def analytic_memory(cfg: ModelConfig, workload: Workload, strategy: Strategy) -> MemoryEstimate:
    sizes = spmd_sizes(strategy)
    params = sharded_params(cfg, strategy)
    local = sum(sp.local_elems * sp.count for sp in params)
    m, p = strategy.microbatches, strategy.size("pipeline")
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
                per_layer[sp.group.where] = per_layer.get(sp.group.where, 0.0) + sp.local_elems * sizes["fsdp"]
        gathered = 2 * max(per_layer.values(), default=0.0) * pbytes

    b = workload.global_batch / (strategy.batch_shards * m)
    s = workload.seq_len / sizes["sequence"]
    in_flight = min(m, p) if p > 1 else 1
    acts = 0.0
    live = 0.0
    for moe, layers in zip((False, True), stage_layers(cfg, p)):
        if layers <= 0:
            continue
        full, dots = _layer_bytes(cfg, moe, b, s, workload.seq_len, sizes)
        if strategy.remat == "none":
            acts += layers * full
        elif strategy.remat == "full":
            acts += layers * b * s * cfg.hidden * ACT_BYTES
        else:
            if strategy.remat == "dots_nobatch":  # attention score/PV dots have batch dims: not saved
                dots -= b * s * (cfg.heads / sizes["tensor"]) * workload.seq_len * F32
            acts += layers * dots
        live = max(live, full)
    acts *= in_flight  # saved activations of every microbatch in flight; one layer's backward runs at a time
    if strategy.remat != "none":
        acts += live
    logits = b * s * cfg.vocab_size / sizes["tensor"] * 2 * F32
    return MemoryEstimate(params=local * pbytes, grads=grads, optimizer=2 * local * dtype_bytes(workload.optimizer_state_dtype) / zero_shards,
                          gathered=gathered,
                          activations=acts, logits=logits)

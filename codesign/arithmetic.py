"""Closed-form parameter and FLOP counts from a `ModelConfig`.

These must equal what the Flax models in `codesign.models` build (a test compares them with the
abstract state), so the planner's analytic estimator and the explorer can use them without
constructing a model.

FLOP convention (used by MFU everywhere in codesign, and stated in the README):
    train FLOPs per token = 6 * (active matmul params, input embedding excluded)
                          + 3 * attention_fwd_flops_per_token(seq_len, causal=True)
    attention fwd per token per layer = 2 * heads * (qk_head_dim + v_head_dim) * context,
    with context = seq_len / 2 for causal attention (only the lower triangle is real work).
Recompute from remat is not "model" FLOPs and is never counted in MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from codesign.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # parameters touched per token (all experts' shared parts + top-k routed experts)
    embedding: int  # input embedding table (a lookup, no matmul FLOPs)
    lm_head: int  # 0 when tied


def attention_params(cfg: ModelConfig) -> int:
    d, h = cfg.hidden, cfg.heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
        else:
            q = d * h * qk
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        o = h * cfg.v_head_dim * d
        return q + kv + o
    hd, kvh = cfg.head_dim, cfg.kv_heads
    p = d * h * hd + 2 * d * kvh * hd + h * hd * d
    if cfg.qkv_bias:
        p += (h + 2 * kvh) * hd
    return p


def ffn_params(cfg: ModelConfig, width: int) -> int:
    mats = 3 if cfg.ffn_activation == "swiglu" else 2  # the gated form (SwiGLU or GeGLU) has a gate matrix
    return mats * cfg.hidden * width


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) params of one MoE FFN block: router + routed experts + shared experts."""
    router = cfg.hidden * cfg.n_routed_experts
    expert = ffn_params(cfg, cfg.moe_mlp_dim)
    shared = ffn_params(cfg, cfg.moe_mlp_dim * cfg.n_shared_experts) if cfg.n_shared_experts else 0
    total = router + cfg.n_routed_experts * expert + shared
    active = router + cfg.experts_per_token * expert + shared
    return total, active


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d = cfg.hidden
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    per_layer_common = attention_params(cfg) + 2 * d  # two RMSNorm scales
    dense_ffn = ffn_params(cfg, cfg.mlp_dim) if cfg.dense_layers else 0
    moe_total, moe_active = moe_params(cfg) if cfg.is_moe else (0, 0)
    body_total = cfg.layers * per_layer_common + cfg.dense_layers * dense_ffn + cfg.moe_layers * moe_total
    body_active = cfg.layers * per_layer_common + cfg.dense_layers * dense_ffn + cfg.moe_layers * moe_active
    extra = embedding + lm_head + d  # final norm
    return ParamCounts(
        total=body_total + extra, active=body_active + extra, embedding=embedding, lm_head=lm_head
    )


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Active parameters that each token multiplies through (the embedding lookup is not a matmul).

    With tied embeddings the table is still used once as the LM head, so it counts once.
    """
    pc = param_counts(cfg)
    return pc.active - pc.embedding + (pc.embedding if cfg.tie_embeddings else 0)


def attention_fwd_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Score (QK^T) and value (PV) matmul FLOPs of one token's forward pass, all layers."""
    context = seq_len / 2 if causal else seq_len
    per_layer = 2 * cfg.heads * (cfg.qk_head_dim + cfg.attn_v_head_dim) * context
    return per_layer * cfg.layers


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), the MFU numerator."""
    return 6.0 * matmul_params_per_token(cfg) + 3.0 * attention_fwd_flops_per_token(cfg, seq_len, causal)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    return 2.0 * matmul_params_per_token(cfg) + attention_fwd_flops_per_token(cfg, seq_len, causal)


def causal_block_fraction(seq_len: int, block_q: int, block_kv: int) -> float:
    """Fraction of the seq_len x seq_len score matrix a block-sparse causal kernel computes: the
    (block_q x block_kv) tiles that hold at least one unmasked score (j*block_kv <= last query of
    tile i), the diagonal tiles computed whole. -> 1/2 for long sequences; 1 for one tile."""
    nq, nk = max(1, seq_len // block_q), max(1, seq_len // block_kv)
    tiles = sum(min(nk, ((i + 1) * block_q - 1) // block_kv + 1) for i in range(nq))
    return tiles / (nq * nk)


def pipeline_ticks(microbatches: int, stages: int, repeats: int = 1) -> int:
    """Forward ticks of the executed pipeline (`codesign.pipeline`, `codesign.pipeline_1f1b`): each of
    the M x V microbatch chunk-passes enters stage 0 on its own tick, and the last one needs p - 1 more
    to leave the last stage. Every stage computes on every tick, so p - 1 ticks per stage are fill or
    drain bubble. The 1F1B loop has as many backward ticks, offset (`pipeline_loops`)."""
    return microbatches * repeats + stages - 1


def pipeline_loops(microbatches: int, stages: int, repeats: int = 1) -> tuple[int, int, int]:
    """Trip counts of the 1F1B program's three loops (`codesign.pipeline_1f1b`): warm-up (forward
    chunks only), steady (a forward and a backward chunk per tick), drain (backward only). The first
    backward starts on the last stage when the first microbatch leaves it, after p V - 1 ticks."""
    m, p, v = microbatches, stages, repeats
    return p * v - 1, m * v + p - p * v, p * v - 1


def ring_slots(microbatches: int, stages: int, repeats: int = 1) -> int:
    """Chunk forwards whose residuals the 1F1B program's first stage holds at once: a forward's
    residuals wait 2 (p V - 1) ticks on stage 0 for their backward, one forward entering per tick."""
    return min(2 * stages * repeats - 1, microbatches * repeats)


def stage_layers(cfg: ModelConfig, stages: int) -> tuple[float, int]:
    """(dense, MoE) layers whose work the heaviest of `stages` pipeline devices does per microbatch.

    A dense (or all-MoE) model pipelines every layer: ceil(layers / stages) on the heaviest stage
    (uneven splits are padded: DeepSeek-V3's 61 layers ran on 16 stages, 4 on the heaviest). An MoE
    model with a dense prefix pipelines its MoE stack, ceil(moe / stages) per stage, and runs the
    prefix before the pipeline for the whole batch, split over the stages (`train_step`), so each
    device does dense / stages of a layer per microbatch: a fraction, not a count of layers.
    """
    if stages <= 1:
        return cfg.dense_layers, cfg.moe_layers
    if cfg.moe_layers and cfg.dense_layers:
        return cfg.dense_layers / stages, -(-cfg.moe_layers // stages)
    total = -(-cfg.layers // stages)
    moe = min(cfg.moe_layers, total)
    return total - moe, moe


def pipelined_layers(cfg: ModelConfig, stages: int) -> int:
    """Layers of the pipelined stack on each of `stages` stages (its V chunks split these): the MoE
    stack of an MoE model with a dense prefix, else every layer."""
    stack = cfg.moe_layers if cfg.moe_layers and cfg.dense_layers else cfg.layers
    return -(-stack // max(stages, 1))

"""The logical axis vocabulary: the only names model code may use for array dimensions.

Models name axes; plans choose layouts. A `Rules` table (codesign.sharding.rules) maps each of these
names to zero or more mesh axes. Model code never names a mesh axis.

Param axes
    vocab      token vocabulary (embedding rows, LM-head columns)
    embed      the model (residual stream) width, d_model
    mlp        the FFN intermediate width (dense or per expert)
    heads      query attention heads
    kv_heads   key/value heads (GQA/MQA); equals heads for MHA
    head_dim   per-head width (q/k/v); never sharded by the default rules
    qkv        the slot inside one kv group of a fused q/k/v projection (its query heads, then k, then
               v); never sharded: the group's kv_heads dim carries the tensor sharding
    q_lora     MLA query low-rank bottleneck width (q_lora_rank)
    kv_lora    MLA key/value latent width (kv_lora_rank + the shared RoPE key)
    expert     routed-expert index of an MoE layer
    layers     the stacked-layer axis introduced by nnx.scan

Activation axes
    act_batch  batch (sequences) of an activation
    act_seq    sequence positions of an activation
    act_norm_seq  sequence positions of the residual stream and its norms between tensor-parallel
               blocks (MaxText's activation_norm_length): context parallelism like act_seq, plus the
               tensor axis under sequence parallelism (`sp=1`)
    act_embed  d_model width of an activation
    act_mlp    FFN intermediate width of an activation
    act_heads  attention heads of an activation
    act_vocab  vocabulary width of the logits
    act_expert expert index of dispatched MoE activations
"""

from __future__ import annotations

VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
QKV = "qkv"
Q_LORA = "q_lora"
KV_LORA = "kv_lora"
EXPERT = "expert"
LAYERS = "layers"

ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_NORM_SEQ = "act_norm_seq"
ACT_EMBED = "act_embed"
ACT_MLP = "act_mlp"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"
ACT_EXPERT = "act_expert"

PARAM_AXES = (VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, QKV, Q_LORA, KV_LORA, EXPERT, LAYERS)
ACTIVATION_AXES = (ACT_BATCH, ACT_SEQ, ACT_NORM_SEQ, ACT_EMBED, ACT_MLP, ACT_HEADS, ACT_VOCAB, ACT_EXPERT)
ALL_AXES = frozenset(PARAM_AXES + ACTIVATION_AXES)

# Mesh axis names, outermost first in the default device order. Innermost axes land on the
# fastest network level (NVLink / one torus dimension), so tensor parallelism goes last.
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "sequence", "tensor")

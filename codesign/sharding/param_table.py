"""Every param the Flax models build, from the `ModelConfig` alone: one layer's shape, its logical
axes, and which stack it lives in.

It mirrors `codesign/models/*.py` (a test pins its total to `arithmetic.param_counts` and its names to
the abstract model's), so the enumerator can check a layout's divisibility through the rules it is
given, and the closed form can shard every param as `TrainProgram` would, without building a model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from codesign import axes as A
from codesign.config import ModelConfig


@dataclass(frozen=True)
class ParamGroup:
    name: str
    shape: tuple[int, ...]  # one layer's shape (no leading layer axis)
    logical: tuple[str | None, ...]
    where: str  # "dense" | "moe" (per layer of that stack) | "global" (once)

    @property
    def elems(self) -> int:
        return math.prod(self.shape)


def _attention(cfg: ModelConfig) -> list[tuple]:
    d, n = cfg.hidden, cfg.heads
    if cfg.attention != "mla":
        k, h = cfg.kv_heads, cfg.head_dim
        wo = ("attn.wo", (n, h, d), (A.HEADS, A.HEAD_DIM, A.EMBED))
        if cfg.fused_qkv:
            fused = (k, n // k + 2, h), (A.KV_HEADS, A.QKV, A.HEAD_DIM)
            out = [("attn.wqkv", (d, *fused[0]), (A.EMBED, *fused[1])), wo]
            return out + ([("attn.bqkv", *fused)] if cfg.qkv_bias else [])
        out = [
            ("attn.wq", (d, n, h), (A.EMBED, A.HEADS, A.HEAD_DIM)),
            ("attn.wk", (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM)),
            ("attn.wv", (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM)),
            wo,
        ]
        if cfg.qkv_bias:
            out += [
                ("attn.bq", (n, h), (A.HEADS, A.HEAD_DIM)),
                ("attn.bk", (k, h), (A.KV_HEADS, A.HEAD_DIM)),
                ("attn.bv", (k, h), (A.KV_HEADS, A.HEAD_DIM)),
            ]
        return out
    qk, rope = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        out = [
            ("attn.wq_a", (d, cfg.q_lora_rank), (A.EMBED, A.Q_LORA)),
            ("attn.q_norm", (cfg.q_lora_rank,), (A.Q_LORA,)),
            ("attn.wq_b", (cfg.q_lora_rank, n, qk), (A.Q_LORA, A.HEADS, A.HEAD_DIM)),
        ]
    else:
        out = [("attn.wq", (d, n, qk), (A.EMBED, A.HEADS, A.HEAD_DIM))]
    return out + [
        ("attn.wkv_a", (d, cfg.kv_lora_rank + rope), (A.EMBED, A.KV_LORA)),
        ("attn.kv_norm", (cfg.kv_lora_rank,), (A.KV_LORA,)),
        (
            "attn.wkv_b",
            (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim),
            (A.KV_LORA, A.HEADS, A.HEAD_DIM),
        ),
        ("attn.wo", (n, cfg.v_head_dim, d), (A.HEADS, A.HEAD_DIM, A.EMBED)),
    ]


def _mlp(cfg: ModelConfig, prefix: str, width: int) -> list[tuple]:
    d = cfg.hidden
    out = [(f"{prefix}.w_gate", (d, width), (A.EMBED, A.MLP))] if cfg.ffn_activation == "swiglu" else []
    return out + [
        (f"{prefix}.w_up", (d, width), (A.EMBED, A.MLP)),
        (f"{prefix}.w_down", (width, d), (A.MLP, A.EMBED)),
    ]


@functools.lru_cache(maxsize=256)
def param_groups(cfg: ModelConfig) -> tuple[ParamGroup, ...]:
    """Every param of the model (mirrors codesign/models/*.py)."""
    d = cfg.hidden
    common = [("attn_norm", (d,), (A.EMBED,)), ("ffn_norm", (d,), (A.EMBED,))] + _attention(cfg)
    out = []
    if cfg.dense_layers:
        out += [ParamGroup(n, s, lg, "dense") for n, s, lg in common + _mlp(cfg, "mlp", cfg.mlp_dim)]
    if cfg.moe_layers:
        e, f = cfg.n_routed_experts, cfg.moe_mlp_dim
        moe = [
            ("moe.router", (d, e), (A.EMBED, None)),
            ("moe.w_gate", (e, d, f), (A.EXPERT, A.EMBED, A.MLP)),
            ("moe.w_up", (e, d, f), (A.EXPERT, A.EMBED, A.MLP)),
            ("moe.w_down", (e, f, d), (A.EXPERT, A.MLP, A.EMBED)),
        ]
        if cfg.n_shared_experts:
            moe += _mlp(cfg, "moe.shared", f * cfg.n_shared_experts)
        out += [ParamGroup(n, s, lg, "moe") for n, s, lg in common + moe]
    out.append(ParamGroup("embed", (cfg.vocab_size, d), (A.VOCAB, A.EMBED), "global"))
    out.append(ParamGroup("final_norm", (d,), (A.EMBED,), "global"))
    if not cfg.tie_embeddings:
        out.append(ParamGroup("lm_head", (d, cfg.vocab_size), (A.EMBED, A.VOCAB), "global"))
    return tuple(out)

"""Model presets with their published shapes, and the published parameter counts they must match.

Every preset carries `published_params_total` / `published_params_active` and a `source`.
`tests/test_presets.py` checks the closed-form counts against them (within 1%).
"""

from __future__ import annotations

from codesign.config import ConfigError, ModelConfig

_PRESETS: dict[str, ModelConfig] = {}


def _add(cfg: ModelConfig) -> None:
    _PRESETS[cfg.name] = cfg


_add(
    ModelConfig(
        name="llama3-8b",
        vocab_size=128256,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        mlp_dim=14336,
        rope_theta=500000.0,
        published_params_total=8.03e9,
        published_params_active=8.03e9,
        source="Llama 3 model card / HF meta-llama/Meta-Llama-3-8B config.json (8.03B)",
    )
)
_add(
    ModelConfig(
        name="llama3.1-70b",
        vocab_size=128256,
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        mlp_dim=28672,
        rope_theta=500000.0,
        published_params_total=70.6e9,
        published_params_active=70.6e9,
        source="HF meta-llama/Llama-3.1-70B config.json; 70.6B in the model card",
    )
)
_add(
    ModelConfig(
        name="llama3.1-405b",
        vocab_size=128256,
        hidden=16384,
        layers=126,
        heads=128,
        kv_heads=8,
        mlp_dim=53248,
        rope_theta=500000.0,
        published_params_total=405.9e9,
        published_params_active=405.9e9,
        source="The Llama 3 Herd of Models (arXiv 2407.21783) Table 3; HF Llama-3.1-405B (405.9B)",
    )
)
_add(
    ModelConfig(
        name="qwen2.5-72b",
        vocab_size=152064,
        hidden=8192,
        layers=80,
        heads=64,
        kv_heads=8,
        mlp_dim=29568,
        qkv_bias=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        published_params_total=72.7e9,
        published_params_active=72.7e9,
        source="Qwen2.5 technical report (arXiv 2412.15115); HF Qwen2.5-72B (72.7B)",
    )
)
_add(
    ModelConfig(
        name="mixtral-8x7b",
        vocab_size=32000,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        mlp_dim=0,
        n_routed_experts=8,
        experts_per_token=2,
        moe_mlp_dim=14336,
        rope_theta=1000000.0,
        published_params_total=46.7e9,
        published_params_active=12.9e9,
        source="Mixtral of Experts (arXiv 2401.04088): 46.7B total, 12.9B active per token",
    )
)
_add(
    ModelConfig(
        name="deepseek-v2",
        vocab_size=102400,
        hidden=5120,
        layers=60,
        heads=128,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mlp_dim=12288,
        n_routed_experts=160,
        n_shared_experts=2,
        experts_per_token=6,
        moe_mlp_dim=1536,
        first_dense_layers=1,
        norm_eps=1e-6,
        published_params_total=236e9,
        published_params_active=21e9,
        published_active_excludes_embedding=True,
        published_rounding=0.5e9,
        source="DeepSeek-V2 (arXiv 2405.04434): 236B total, 21B activated; HF deepseek-ai/DeepSeek-V2 config",
    )
)
_add(
    ModelConfig(
        name="deepseek-v3",
        vocab_size=129280,
        hidden=7168,
        layers=61,
        heads=128,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mlp_dim=18432,
        n_routed_experts=256,
        n_shared_experts=1,
        experts_per_token=8,
        moe_mlp_dim=2048,
        first_dense_layers=3,
        router="sigmoid",
        # Node-limited routing (HF config n_group=8, topk_group=4): each token to at most 4 of 8 groups.
        expert_groups=8,
        groups_per_token=4,
        norm_eps=1e-6,
        published_params_total=671e9,
        published_params_active=37e9,
        published_active_excludes_embedding=True,
        published_rounding=0.5e9,
        source="DeepSeek-V3 technical report (arXiv 2412.19437): 671B total, 37B activated (MTP module excluded)",
    )
)
_add(
    ModelConfig(
        name="gpt3-175b",
        vocab_size=50257,
        hidden=12288,
        layers=96,
        heads=96,
        mlp_dim=4 * 12288,
        attention="mha",
        ffn_activation="gelu",
        tie_embeddings=True,
        published_params_total=175e9,
        published_params_active=175e9,
        source="Language Models are Few-Shot Learners (arXiv 2005.14165) Table 2.1: 175.0B "
        "(codesign uses RoPE instead of learned positions: 25M fewer params)",
    )
)

# Tiny models for tests: every dimension divisible by 8 so that any 8-device layout is valid.
_add(
    ModelConfig(
        name="tiny-dense",
        vocab_size=256,
        hidden=64,
        layers=2,
        heads=8,
        kv_heads=4,
        head_dim=16,
        mlp_dim=128,
        source="test model",
    )
)
_add(
    ModelConfig(
        name="tiny-moe",
        vocab_size=256,
        hidden=64,
        layers=3,
        heads=8,
        kv_heads=4,
        head_dim=16,
        mlp_dim=128,
        n_routed_experts=8,
        n_shared_experts=1,
        experts_per_token=2,
        moe_mlp_dim=32,
        first_dense_layers=1,
        capacity_factor=2.0,
        source="test model (DeepSeek-style: shared expert, first layer dense)",
    )
)
_add(
    ModelConfig(
        name="tiny-mla",
        vocab_size=256,
        hidden=64,
        layers=2,
        heads=8,
        attention="mla",
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mlp_dim=128,
        source="test model (MLA with q_lora)",
    )
)


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}. Known presets: {', '.join(_PRESETS)}; or pass a YAML ModelConfig "
            "or a Hugging Face config.json path"
        ) from None

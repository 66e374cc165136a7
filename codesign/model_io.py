"""`--model` resolution: a preset name, a YAML `ModelConfig`, or a Hugging Face style config.json.

HF field names understood: Llama / Qwen2 (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
`num_key_value_heads`, `intermediate_size`, `vocab_size`, `rope_theta`, `rms_norm_eps`,
`tie_word_embeddings`), Mixtral (`num_local_experts`, `num_experts_per_tok`) and DeepSeek-V2/V3
(`q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`,
`n_routed_experts`, `n_shared_experts`, `moe_intermediate_size`, `first_k_dense_replace`,
`scoring_func`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from codesign.config import ConfigError, ModelConfig
from codesign.presets import get_preset


def load_model_config(spec: str) -> ModelConfig:
    if os.path.exists(spec):
        with open(spec) as f:
            text = f.read()
        try:
            data = json.loads(text) if spec.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"model file {spec!r} is not valid {'JSON' if spec.endswith('.json') else 'YAML'}: {e}")
        if not isinstance(data, dict):
            raise ConfigError(f"model file {spec!r} must hold a mapping of fields")
        name = os.path.splitext(os.path.basename(spec))[0]
        return from_hf_config(data, name) if _looks_hf(data) else ModelConfig.from_json({"name": name, **data})
    if spec.endswith((".json", ".yaml", ".yml")):
        raise ConfigError(f"model file {spec!r} not found")
    return get_preset(spec)


def _looks_hf(d: dict[str, Any]) -> bool:
    return "hidden_size" in d or "model_type" in d or "architectures" in d


def from_hf_config(d: dict[str, Any], name: str = "hf-model") -> ModelConfig:
    def need(key: str):
        if key not in d:
            raise ConfigError(f"config.json for {name!r} lacks {key!r} (Llama/Qwen2/Mixtral/DeepSeek field names)")
        return d[key]

    heads = need("num_attention_heads")
    kw: dict[str, Any] = dict(
        name=d.get("_name_or_path", name) or name,
        vocab_size=need("vocab_size"), hidden=need("hidden_size"), layers=need("num_hidden_layers"), heads=heads,
        kv_heads=d.get("num_key_value_heads") or heads, mlp_dim=d.get("intermediate_size", 0),
        rope_theta=float(d.get("rope_theta", 10000.0)), norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("attention_bias", False)) or d.get("model_type") == "qwen2",
        source=f"Hugging Face config ({d.get('model_type', 'unknown')})",
    )
    if d.get("head_dim"):
        kw["head_dim"] = d["head_dim"]
    if d.get("kv_lora_rank"):  # DeepSeek-V2/V3 MLA
        kw.update(attention="mla", q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
                  qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
                  v_head_dim=need("v_head_dim"), kv_heads=heads)
    experts = d.get("n_routed_experts") or d.get("num_local_experts") or 0
    if experts:
        kw.update(n_routed_experts=experts, experts_per_token=need("num_experts_per_tok"),
                  n_shared_experts=d.get("n_shared_experts") or 0,
                  moe_mlp_dim=d.get("moe_intermediate_size") or d.get("intermediate_size"),
                  first_dense_layers=d.get("first_k_dense_replace", 0),
                  router="sigmoid" if d.get("scoring_func") == "sigmoid" else "softmax")
        if "num_local_experts" in d and not d.get("n_routed_experts"):  # Mixtral: every layer is MoE
            kw["mlp_dim"] = 0
    if kw.get("attention") != "mla":
        kw["attention"] = "mha" if kw["kv_heads"] == heads else "gqa"
    return ModelConfig(**kw)

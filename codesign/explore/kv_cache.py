"""KV-cache bytes per token, from a model's config (the ISCA 2025 DeepSeek paper's Table 1).

What a decoder must keep per token of context, summed over layers:

* MLA (DeepSeek-V2/V3) caches the compressed KV latent plus the one RoPE key that all heads share:
  ``kv_lora_rank + qk_rope_head_dim`` elements per layer (the up-projections are recomputed or
  absorbed, never cached).
* MHA / GQA / MQA cache a key and a value per KV head: ``2 * kv_heads * head_dim`` per layer.

Bytes = elements x layers x bytes per element of the cache dtype. KB in the tables is 1000 bytes,
as in the paper. The models in ``codesign.models`` have no decode path, so there are no cache
buffers to compare this formula against; it is checked against the paper's published bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from codesign.config import ConfigError, ModelConfig, dtype_bytes

# The paper's Table 1 (BF16, 1 KB = 1000 bytes): model -> (KB per token, ratio to DeepSeek-V3).
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "deepseek-v3": (70.272, 1.0),
    "qwen2.5-72b": (327.680, 4.66),
    "llama3.1-405b": (516.096, 7.28),
}


def resolve_model(model: str | ModelConfig) -> ModelConfig:
    """A ModelConfig as given, or a preset name / YAML / HF config.json path resolved."""
    if isinstance(model, ModelConfig):
        return model
    from codesign.model_io import load_model_config

    return load_model_config(model)


def kv_elements_per_token_per_layer(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.kv_heads * cfg.head_dim


def kv_formula(cfg: ModelConfig) -> str:
    if cfg.attention == "mla":
        return (
            f"(kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim})"
            f" x {cfg.layers} layers"
        )
    return f"2 x {cfg.kv_heads} kv_heads x {cfg.head_dim} head_dim x {cfg.layers} layers"


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16") -> float:
    """Bytes of KV cache one token of context occupies, all layers together."""
    b = kv_elements_per_token_per_layer(cfg) * cfg.layers * dtype_bytes(dtype)
    return int(b) if float(b).is_integer() else b


def kv_cache_table(models: Sequence[str | ModelConfig], dtype: str = "bf16") -> dict:
    """`explore kv-cache`: one row per model; `ratio` is against the first model."""
    cfgs = [resolve_model(m) for m in models]
    if not cfgs:
        raise ConfigError("kv-cache needs at least one model")
    base = kv_bytes_per_token(cfgs[0], dtype)
    rows = []
    for cfg in cfgs:
        b = kv_bytes_per_token(cfg, dtype)
        paper = PAPER_TABLE1.get(cfg.name) if dtype_bytes(dtype) == 2 else None
        rows.append(
            {
                "model": cfg.name,
                "attention": cfg.attention,
                "kv_bytes_per_token": b,
                "ratio": b / base,
                "kv_kb_per_token": b / 1000.0,
                "elements_per_layer": kv_elements_per_token_per_layer(cfg),
                "layers": cfg.layers,
                "dtype": dtype,
                "formula": kv_formula(cfg),
                "paper_kb_per_token": paper[0] if paper else None,
                "paper_ratio": paper[1] if paper and cfgs[0].name == "deepseek-v3" else None,
            }
        )
    return {
        "rows": rows,
        "dtype": dtype,
        "kb": 1000,
        "notes": [
            "KB = 1000 bytes (as the paper). ratio = kv_bytes_per_token / the first model's.",
            (
                "The paper prints 7.28x for LLaMA-3.1 405B, but its own bytes give 516.096/70.272 = 7.34x; "
                "the bytes, not the paper's ratio, follow from the configs."
            ),
        ],
    }


def render_kv_cache(result: dict) -> Table:
    t = Table(title=f"KV cache per token ({result.get('dtype', 'bf16')}, 1 KB = 1000 B)")
    for col in (
        "model",
        "attention",
        "per layer (elements)",
        "KB / token",
        "ratio",
        "paper KB",
        "paper ratio",
    ):
        t.add_column(col, justify="left" if col in ("model", "attention") else "right")
    for r in result["rows"]:
        t.add_row(
            r["model"],
            r["attention"].upper(),
            f"{r['elements_per_layer']:,} x {r['layers']}",
            f"{r['kv_kb_per_token']:.3f}",
            f"{r['ratio']:.2f}x",
            "" if r.get("paper_kb_per_token") is None else f"{r['paper_kb_per_token']:.3f}",
            "" if r.get("paper_ratio") is None else f"{r['paper_ratio']:.2f}x",
        )
    return t

"""Decode throughput per GPU against context length, for MHA / GQA / MLA variants of one model body.

A closed-form model of batched decoding at the largest batch that fits (or a given batch):

* weights: the model's total parameters x `weight_bytes` (1 = FP8, as DeepSeek serves V3), spread
  evenly over `devices` GPUs (expert/tensor parallel); every step reads all of a GPU's weights (a
  large decode batch touches every local expert);
* KV cache: attention is data-parallel, so a GPU holds the whole (all-layer) cache of its own
  sequences: `kv_bytes_per_token x context` per sequence (`codesign.explore.kv_cache`);
* batch = floor((usable HBM - weights per GPU) / cache per sequence), capped by `max_batch`;
* memory-bound step time = (weights per GPU + batch x cache per sequence) / HBM bandwidth;
  tokens/s per GPU = batch / step time. This is the "memory-bound decode" number.
* roofline check: compute per GPU = batch x (2 x matmul params per token + attention), with the
  attention of one new token against `context` cached ones: GQA/MHA 2*h*(2*head_dim)*context per
  layer; MLA in its absorbed form (scores against the cached latent+RoPE key, values from the latent)
  2*h*(2*kv_lora_rank + qk_rope_head_dim)*context. MLA trades cache bytes for attention FLOPs, so at
  long contexts and large batches it turns compute-bound; the roofline column says when.

Hardware numbers are datasheet peaks from the catalog (HBM bandwidth, usable HBM after the runtime
reserve, dense peak FLOP/s of `compute_dtype`), never achieved rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table

from codesign import arithmetic
from codesign.config import ConfigError, ModelConfig, dtype_bytes
from codesign.explore.kv_cache import kv_bytes_per_token, resolve_model
from codesign.hardware.catalog import Hardware, load_hardware

DEFAULT_CONTEXTS = tuple(1024 * 2**i for i in range(8))  # 1K .. 128K


def attention_variant(
    cfg: ModelConfig,
    kind: str,
    *,
    kv_heads: int = 8,
    head_dim: int = 128,
    kv_lora_rank: int = 512,
    qk_rope_head_dim: int = 64,
    qk_nope_head_dim: int = 128,
    v_head_dim: int = 128,
) -> ModelConfig:
    """The same body (layers, heads, FFN/MoE) with another attention: 'mla', 'gqa' (kv_heads) or 'mha'."""
    if kind == cfg.attention and (kind != "gqa" or cfg.kv_heads == kv_heads):
        return cfg
    clear_mla = {
        "q_lora_rank": 0,
        "kv_lora_rank": 0,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "v_head_dim": 0,
    }
    if kind == "gqa":
        return cfg.replace(
            name=f"{cfg.name}/gqa{kv_heads}",
            attention="gqa",
            kv_heads=kv_heads,
            head_dim=head_dim,
            **clear_mla,
        )
    if kind == "mha":
        return cfg.replace(
            name=f"{cfg.name}/mha", attention="mha", kv_heads=cfg.heads, head_dim=head_dim, **clear_mla
        )
    if kind == "mla":
        return cfg.replace(
            name=f"{cfg.name}/mla",
            attention="mla",
            kv_heads=cfg.heads,
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=qk_rope_head_dim,
            qk_nope_head_dim=qk_nope_head_dim,
            v_head_dim=v_head_dim,
        )
    raise ConfigError(f"attention variant {kind!r}; use mla, gqa or mha")


def attention_decode_flops(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of one new token's attention against `context` cached tokens, all layers."""
    if cfg.attention == "mla":  # absorbed: q.[latent|rope] scores, probs.latent values
        per_head = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_head = 2 * cfg.head_dim
    return 2.0 * cfg.heads * per_head * context * cfg.layers


def decode_point(
    cfg: ModelConfig,
    hw: Hardware,
    context: int,
    *,
    devices: int = 32,
    weight_bytes: float = 1.0,
    kv_dtype: str = "bf16",
    batch: int | None = None,
    max_batch: int | None = None,
    compute_dtype: str = "bf16",
) -> dict:
    kv_tok = kv_bytes_per_token(cfg, kv_dtype)
    kv_seq = kv_tok * context
    w_gpu = arithmetic.param_counts(cfg).total * weight_bytes / devices
    cap = hw.memory_capacity_bytes
    fit_batch = max(0, math.floor((cap - w_gpu) / kv_seq))
    if max_batch is not None:
        fit_batch = min(fit_batch, max_batch)
    b = fit_batch if batch is None else batch
    fits = b <= max(0, math.floor((cap - w_gpu) / kv_seq)) and b > 0
    mem_s = (w_gpu + b * kv_seq) / hw.chip.hbm_bytes_per_s
    flops = b * (2.0 * arithmetic.matmul_params_per_token(cfg) + attention_decode_flops(cfg, context))
    peak = hw.peak_flops.get(compute_dtype) or hw.peak_flops["bf16"]
    comp_s = flops / peak
    step = max(mem_s, comp_s)
    return {
        "model": cfg.name,
        "attention": cfg.attention,
        "hardware": hw.name,
        "context": context,
        "kv_bytes_per_token": kv_tok,
        "kv_bytes_per_sequence": kv_seq,
        "weights_bytes_per_gpu": w_gpu,
        "hbm_usable_bytes": cap,
        "batch": b,
        "fits": bool(fits),
        "memory_s": mem_s,
        "compute_s": comp_s,
        "bound": "memory" if mem_s >= comp_s else "compute",
        "tokens_per_s_per_gpu": b / mem_s if b else 0.0,
        "tokens_per_s_per_gpu_roofline": b / step if b else 0.0,
        "flops_per_token": flops / b if b else 0.0,
    }


def decode_throughput(
    model: str | ModelConfig = "deepseek-v3",
    hardware: str | Hardware = "h800",
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    *,
    variants: Sequence[str] = ("mla", "gqa", "mha"),
    kv_heads: int = 8,
    devices: int = 32,
    weight_bytes: float = 1.0,
    kv_dtype: str = "bf16",
    batch: int | None = None,
    max_batch: int | None = None,
    compute_dtype: str = "bf16",
) -> dict:
    """Rows of `decode_point` for every attention variant x context."""
    base = resolve_model(model)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    dtype_bytes(kv_dtype)  # validate early
    rows = []
    for kind in variants:
        cfg = attention_variant(base, kind, kv_heads=kv_heads)
        for ctx in contexts:
            row = decode_point(
                cfg,
                hw,
                int(ctx),
                devices=devices,
                weight_bytes=weight_bytes,
                kv_dtype=kv_dtype,
                batch=batch,
                max_batch=max_batch,
                compute_dtype=compute_dtype,
            )
            rows.append({"variant": kind, **row})
    return {
        "rows": rows,
        "assumptions": {
            "model": base.name,
            "hardware": hw.name,
            "devices": devices,
            "weight_bytes_per_param": weight_bytes,
            "kv_dtype": kv_dtype,
            "batch": batch,
            "max_batch": max_batch,
            "compute_dtype": compute_dtype,
            "hbm_bytes_per_s": hw.chip.hbm_bytes_per_s,
            "hbm_usable_bytes": hw.memory_capacity_bytes,
            "peak_flops": hw.peak_flops.get(compute_dtype) or hw.peak_flops["bf16"],
        },
    }


def render_decode(result: dict) -> Table:
    a = result["assumptions"]
    t = Table(
        title=f"Decode tokens/s per GPU vs context ({a['model']} body on {a['hardware']}, "
        f"weights {a['weight_bytes_per_param']:g} B/param over {a['devices']} GPUs, KV {a['kv_dtype']})"
    )
    for col in (
        "variant",
        "context",
        "KV KB/token",
        "batch",
        "memory-bound tok/s",
        "roofline tok/s",
        "bound",
    ):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        t.add_row(
            f"{r['variant']} ({r['model']})",
            f"{r['context']:,}",
            f"{r['kv_bytes_per_token'] / 1000:,.1f}",
            str(r["batch"]),
            f"{r['tokens_per_s_per_gpu']:,.0f}",
            f"{r['tokens_per_s_per_gpu_roofline']:,.0f}",
            r["bound"] if r["batch"] else "does not fit",
        )
    return t

"""`--model` resolution: a preset name, a YAML `ModelConfig`, or a Hugging Face style config.json.

A Hugging Face config is read by its `model_type` (or, without one, its `architectures`), and only for
the families the model zoo (`codesign.models`) builds: dense GQA/MHA decoders (Llama, Mistral, Qwen2,
Qwen3, Gemma, Gemma-2), MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and MLA + MoE (DeepSeek-V2/V3).
Everything else is refused with the model type and the unsupported feature named.

What the zoo does not build, and how an import treats it:
- built exactly: GQA/MQA/MHA with any head_dim, QKV bias, SwiGLU and GeGLU FFNs, tied embeddings,
  routed + shared experts, a dense prefix before the MoE layers, MLA with or without a query LoRA;
- accepted with a note (`ModelConfig.notes`, also logged): features that add only vector parameters
  (norm scales, biases, gates; the note gives the exact count left out) or elementwise work (logit
  soft-capping), routing details with the same parameters and FLOPs, and sliding-window attention, which
  is planned as full causal attention (identical for seq_len <= window; an overcount above it);
- refused: non-transformer and encoder models, multimodal wrappers, MoE layer patterns other than
  "k dense layers, then MoE", shared experts whose width is not a multiple of the expert width, and FFN
  activations other than gated SiLU/GELU.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import yaml

from codesign.config import ConfigError, ModelConfig
from codesign.presets import get_preset

log = logging.getLogger(__name__)

# model_type -> (what the zoo builds for it, the HF causal-LM class names)
SUPPORTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("dense GQA", ("LlamaForCausalLM",)),
    "mistral": ("dense GQA", ("MistralForCausalLM",)),
    "qwen2": ("dense GQA, QKV bias", ("Qwen2ForCausalLM",)),
    "qwen3": ("dense GQA", ("Qwen3ForCausalLM",)),
    "gemma": ("dense, GeGLU, tied embeddings", ("GemmaForCausalLM",)),
    "gemma2": ("dense GQA, GeGLU, tied embeddings", ("Gemma2ForCausalLM",)),
    "mixtral": ("MoE", ("MixtralForCausalLM",)),
    "qwen2_moe": ("MoE + shared expert", ("Qwen2MoeForCausalLM",)),
    "qwen3_moe": ("MoE", ("Qwen3MoeForCausalLM",)),
    "olmoe": ("MoE", ("OlmoeForCausalLM",)),
    "deepseek_v2": ("MLA + MoE + shared experts", ("DeepseekV2ForCausalLM",)),
    "deepseek_v3": ("MLA + MoE + shared experts", ("DeepseekV3ForCausalLM",)),
}
# Model types known not to be decoder-only transformers the zoo builds, with the reason.
_REFUSED = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba"), "state-space"),
    **dict.fromkeys(
        ("jamba", "zamba", "zamba2", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid"),
        "hybrid attention/state-space",
    ),
    **dict.fromkeys(("rwkv", "rwkv5", "rwkv6", "recurrent_gemma", "xlstm"), "recurrent"),
    **dict.fromkeys(("t5", "mt5", "umt5", "bart", "mbart", "whisper"), "encoder-decoder"),
    **dict.fromkeys(("bert", "roberta", "deberta", "deberta-v2", "modernbert"), "encoder-only"),
    **dict.fromkeys(
        (
            "gemma3",
            "llava",
            "llava_next",
            "mllama",
            "qwen2_vl",
            "qwen2_5_vl",
            "idefics3",
            "paligemma",
            "llama4",
        ),
        "multimodal",
    ),
}
_ARCH_TO_TYPE = {arch: mt for mt, (_, archs) in SUPPORTED.items() for arch in archs}
_TIED_BY_DEFAULT = ("gemma", "gemma2")  # HF config-class defaults when tie_word_embeddings is absent
_GATE_ACT = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_new": "gelu",
    "gelu_fast": "gelu",
    "gelu_python": "gelu",
}


def load_model_config(spec: str) -> ModelConfig:
    if os.path.exists(spec):
        try:
            with open(spec) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"model file {spec!r} cannot be read as text: {e}") from None
        kind = "JSON" if spec.endswith(".json") else "YAML"
        try:
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            detail = " ".join(str(e).split())  # one line, even for YAML's multi-line messages
            raise ConfigError(f"model file {spec!r} is not valid {kind}: {detail}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"model file {spec!r} must hold a mapping of fields")
        name = os.path.splitext(os.path.basename(spec))[0]
        if not _looks_hf(data):
            return ModelConfig.from_json({"name": name, **data})
        cfg = from_hf_config(data, name)
        for note in cfg.notes:
            log.warning("%s: %s", cfg.name, note)
        return cfg
    if spec.endswith((".json", ".yaml", ".yml")):
        raise ConfigError(f"model file {spec!r} not found")
    return get_preset(spec)


def _looks_hf(d: dict[str, Any]) -> bool:
    return "hidden_size" in d or "model_type" in d or "architectures" in d


def supported_model_types() -> str:
    return ", ".join(SUPPORTED)


def model_type_of(d: dict[str, Any], name: str) -> str:
    """The config's model_type, checked against the zoo (and its architectures against the model type)."""
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(
            f"config.json for {name!r}: architectures must be a list of class names, got {archs!r}"
        )
    mt = d.get("model_type")
    if mt is None:
        known = [_ARCH_TO_TYPE[a] for a in archs if a in _ARCH_TO_TYPE]
        if not known:
            what = f"architectures {archs}" if archs else "no model_type or architectures"
            raise ConfigError(
                f"config.json for {name!r} has {what}; codesign reads model types "
                f'{supported_model_types()} (add the right "model_type")'
            )
        mt = known[0]
    if not isinstance(mt, str):
        raise ConfigError(f"config.json for {name!r}: model_type must be a string, got {mt!r}")
    if mt in _REFUSED:
        raise ConfigError(
            f"model_type {mt} ({_REFUSED[mt]}) is not supported; supported: {supported_model_types()}"
        )
    if mt not in SUPPORTED:
        raise ConfigError(f"model_type {mt} is not supported; supported: {supported_model_types()}")
    expected = SUPPORTED[mt][1]
    stray = [a for a in archs if a not in expected]
    if stray:
        raise ConfigError(
            f"model_type {mt}: architectures {stray} are not a causal LM codesign builds; "
            f"expected {', '.join(expected)}"
        )
    return mt


def _display_name(d: dict[str, Any], stem: str, mt: str) -> str:
    if stem != "config":
        return stem
    hub = d.get("_name_or_path")
    if isinstance(hub, str) and "/" in hub and not hub.startswith((".", "/")):
        return hub.rstrip("/").rsplit("/", 1)[-1]  # "Qwen/Qwen3-30B-A3B" -> "Qwen3-30B-A3B"
    return mt


class _Reader:
    """Typed access to one config.json, with one-line errors that name the file's model and the field."""

    def __init__(self, d: dict[str, Any], name: str, mt: str):
        self.d, self.name, self.mt = d, name, mt

    def fail(self, msg: str) -> ConfigError:
        return ConfigError(f"model_type {self.mt} ({self.name}): {msg}")

    def int(self, key: str, default: int | None = None, *, required: bool = False) -> int:
        v = self.d.get(key)
        if v is None:
            if required:
                raise self.fail(f"config.json lacks {key!r}")
            return default  # type: ignore[return-value]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self.fail(f"{key}={v!r} must be a non-negative integer")
        return v

    def num(self, key: str, default: float) -> float:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(f"{key}={v!r} must be a number")
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.d.get(key, default)
        return default if v is None else bool(v)


def from_hf_config(d: dict[str, Any], name: str = "hf-model") -> ModelConfig:
    """A `ModelConfig` for a supported Hugging Face config.json, or a `ConfigError` naming what is not."""
    mt = model_type_of(d, name)
    r = _Reader(d, _display_name(d, name, mt), mt)
    notes: list[tuple[str, int]] = []  # (sentence, parameters it leaves out of the count)
    hidden, layers = r.int("hidden_size", required=True), r.int("num_hidden_layers", required=True)
    heads = r.int("num_attention_heads", required=True)
    kw: dict[str, Any] = {
        "name": r.name,
        "vocab_size": r.int("vocab_size", required=True),
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": r.int("num_key_value_heads") or heads,
        "head_dim": r.int("head_dim") or 0,
        "mlp_dim": r.int("intermediate_size", 0),  # the dense FFN width (the MoE families re-read it)
        "rope_theta": r.num("rope_theta", 10000.0),
        "norm_eps": r.num("rms_norm_eps", 1e-6),
        "tie_embeddings": r.flag("tie_word_embeddings", mt in _TIED_BY_DEFAULT),
        "attention_dropout": r.num("attention_dropout", 0.0),  # the HF families that have it; 0 in most
        "source": f"Hugging Face config.json (model_type {mt}: {', '.join(SUPPORTED[mt][1])})",
    }
    if mt in ("gemma", "gemma2") and not kw["head_dim"]:
        kw["head_dim"] = 256  # GemmaConfig / Gemma2Config default
    head_dim = kw["head_dim"] or hidden // max(heads, 1)
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act not in _GATE_ACT:
        raise r.fail(f"FFN activation {act!r} is not supported (gated SiLU or GELU only)")
    kw["ffn_gate_activation"] = _GATE_ACT[act]

    _attention(r, mt, kw, notes, hidden, head_dim)
    _moe(r, mt, kw, notes)
    _extras(r, mt, kw, notes, hidden)
    try:
        cfg = ModelConfig(**kw)
    except ConfigError as e:  # drop ModelConfig's own "model 'x': " prefix; r.fail names model and type
        raise r.fail(str(e).removeprefix(f"model {r.name!r}: ")) from None
    if notes:
        from codesign.arithmetic import param_counts

        total = param_counts(cfg).total
        cfg = cfg.replace(
            notes=tuple(
                f"{text}: {n:,} parameters ({_share(n, total)} of the total) left out" if n else text
                for text, n in notes
            )
        )
    return cfg


def _note(notes: list, text: str, left_out: int = 0) -> None:
    notes.append((text, left_out))


def _share(part: int, total: int) -> str:
    pct = 100 * part / total
    return f"{pct:.2f}%" if pct >= 0.01 else "under 0.01%"


def _attention(r: _Reader, mt: str, kw: dict, notes: list, hidden: int, head_dim: int) -> None:
    heads, kvh, layers = kw["heads"], kw["kv_heads"], kw["layers"]
    if mt in ("deepseek_v2", "deepseek_v3"):
        if not r.int("kv_lora_rank"):
            raise r.fail("config.json lacks 'kv_lora_rank' (multi-head latent attention)")
        kw.update(
            attention="mla",
            q_lora_rank=r.int("q_lora_rank", 0),
            kv_lora_rank=r.int("kv_lora_rank"),
            qk_nope_head_dim=r.int("qk_nope_head_dim", required=True),
            qk_rope_head_dim=r.int("qk_rope_head_dim", required=True),
            v_head_dim=r.int("v_head_dim", required=True),
            kv_heads=heads,
            head_dim=0,
        )
        if r.flag("attention_bias"):
            raise r.fail("attention_bias=true with MLA is not supported")
        return
    kw["attention"] = "mha" if kvh == heads else "gqa"
    if mt in ("qwen2", "qwen2_moe"):
        kw["qkv_bias"] = True  # Qwen2 attention: q/k/v projections always carry a bias, o_proj none
    elif mt != "mistral" and r.flag("attention_bias"):
        kw["qkv_bias"] = True  # Llama-style attention_bias: q, k, v *and* o_proj biases
        _note(
            notes, "attention_bias also puts a bias on o_proj, which codesign does not build", hidden * layers
        )
    if mt in ("qwen3", "qwen3_moe"):
        _note(notes, "QK-norm (RMSNorm over each query and key head) is not modeled", 2 * head_dim * layers)
    if mt == "olmoe":
        _note(
            notes,
            "QK-norm (RMSNorm over the query and key projections) is not modeled",
            (heads + kvh) * head_dim * layers,
        )
    _sliding_window(r, mt, notes)


def _sliding_window(r: _Reader, mt: str, notes: list) -> None:
    if mt == "gemma2":
        window, where = r.int("sliding_window_size") or r.int("sliding_window", 4096), "every other layer"
    elif mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if not r.flag("use_sliding_window"):
            return  # the window fields are inert unless use_sliding_window is set
        full = r.int("max_window_layers", 0)
        window, where = r.int("sliding_window"), f"layers {full} and up"
    else:
        window, where = r.int("sliding_window"), "every layer"
    longest = r.int("max_position_embeddings") or 0
    if not window or (longest and window >= longest):
        return  # no window, or one that no sequence the model takes can exceed
    _note(
        notes,
        f"sliding-window attention (window {window}, {where}) is planned as full causal attention: "
        f"the same computation for seq_len <= {window}; longer sequences overcount attention "
        "FLOPs and memory",
    )


def _moe_layout(r: _Reader, mt: str) -> int:
    """Dense layers before the first MoE layer; refuses layouts other than 'dense prefix, then all MoE'."""
    layers = r.int("num_hidden_layers")
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = r.int("decoder_sparse_step", 1) or 1
        only_mlp = r.d.get("mlp_only_layers") or []
        if not isinstance(only_mlp, list) or not all(isinstance(i, int) for i in only_mlp):
            raise r.fail(f"mlp_only_layers={only_mlp!r} must be a list of layer indices")
        is_moe = [i not in only_mlp and (i + 1) % step == 0 for i in range(layers)]
    elif mt in ("deepseek_v2", "deepseek_v3"):
        first, freq = r.int("first_k_dense_replace", 0), r.int("moe_layer_freq", 1) or 1
        is_moe = [i >= first and i % freq == 0 for i in range(layers)]
    else:
        return 0
    k = is_moe.index(True) if any(is_moe) else layers
    if not all(is_moe[k:]):
        dense_after = [i for i in range(k, layers) if not is_moe[i]]
        raise r.fail(
            f"dense FFN layers {dense_after[:4]}{'...' if len(dense_after) > 4 else ''} between MoE "
            "layers are not supported (codesign builds k dense layers, then only MoE layers)"
        )
    if k == layers:
        raise r.fail("no layer is an MoE layer; load it as the dense model it is (model_type without _moe)")
    return k


def _moe(r: _Reader, mt: str, kw: dict, notes: list) -> None:
    d, hidden, layers = r.d, kw["hidden"], kw["layers"]
    if mt in ("mixtral", "olmoe"):  # every layer MoE; intermediate_size is the expert width
        experts = r.int("num_local_experts" if mt == "mixtral" else "num_experts", required=True)
        kw.update(
            n_routed_experts=experts,
            experts_per_token=r.int("num_experts_per_tok", required=True),
            moe_mlp_dim=r.int("intermediate_size", required=True),
            mlp_dim=0,
        )
    elif mt in ("qwen2_moe", "qwen3_moe"):
        first = _moe_layout(r, mt)
        width = r.int("moe_intermediate_size", required=True)
        kw.update(
            n_routed_experts=r.int("num_experts", required=True),
            experts_per_token=r.int("num_experts_per_tok", required=True),
            moe_mlp_dim=width,
            first_dense_layers=first,
            mlp_dim=r.int("intermediate_size", 0) if first else 0,
        )
        shared = r.int("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
        if shared:
            if shared % width:
                raise r.fail(
                    f"shared_expert_intermediate_size={shared} is not a multiple of "
                    f"moe_intermediate_size={width}; codesign's shared expert is n x that width"
                )
            kw["n_shared_experts"] = shared // width
            _note(
                notes,
                "the shared expert's sigmoid gate (shared_expert_gate) is not modeled",
                hidden * (layers - first),
            )
    elif mt in ("deepseek_v2", "deepseek_v3"):
        first = _moe_layout(r, mt)
        kw.update(
            n_routed_experts=r.int("n_routed_experts", required=True),
            experts_per_token=r.int("num_experts_per_tok", required=True),
            n_shared_experts=r.int("n_shared_experts", 0),
            moe_mlp_dim=r.int("moe_intermediate_size", required=True),
            first_dense_layers=first,
            mlp_dim=r.int("intermediate_size", 0) if first else 0,
        )
        scoring = d.get("scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise r.fail(f"scoring_func={scoring!r} is not supported (softmax or sigmoid routers)")
        kw["router"] = scoring
        if mt == "deepseek_v3" or d.get("topk_method") == "noaux_tc":
            _note(
                notes,
                "the router's score-correction bias (e_score_correction_bias) is not modeled",
                kw["n_routed_experts"] * (layers - first),
            )
        if (r.int("n_group", 1) or 1) > 1 and d.get("topk_method") in ("group_limited_greedy", "noaux_tc"):
            kw.update(expert_groups=r.int("n_group", 1), groups_per_token=r.int("topk_group", 0))
            if d.get("topk_method") == "group_limited_greedy":
                _note(
                    notes,
                    "group-limited routing ranks groups by the sum of their top k/M affinities "
                    "(DeepSeek-V3's rule); V2's greedy rule ranks by the group maximum: same FLOPs",
                )
        mtp = r.int("num_nextn_predict_layers", 0)
        if mtp:
            _note(
                notes,
                f"the multi-token-prediction module ({mtp} layer) is not modeled; DeepSeek's "
                "published totals leave it out too",
            )
    else:
        return
    renormalized = r.flag("norm_topk_prob", mt == "mixtral")  # Mixtral always renormalizes its top-k
    if kw.get("router", "softmax") == "softmax" and kw["experts_per_token"] > 1 and not renormalized:
        _note(
            notes,
            "HF does not renormalize the top-k gate weights (norm_topk_prob=false); codesign "
            "does: same parameters and FLOPs",
        )


def _extras(r: _Reader, mt: str, kw: dict, notes: list, hidden: int) -> None:
    layers = kw["layers"]
    if mt == "gemma2":
        caps = [
            f"{k.split('_')[0]} {r.d[k]}"
            for k in ("attn_logit_softcapping", "final_logit_softcapping")
            if r.d.get(k)
        ]
        if caps:
            _note(
                notes,
                f"logit soft-capping ({', '.join(caps)}) is not modeled: elementwise tanh, "
                "no parameters, negligible FLOPs",
            )
        _note(
            notes,
            "the post-attention and post-FFN RMSNorms (Gemma-2's sandwich norms) are not modeled",
            2 * hidden * layers,
        )
    if r.flag("mlp_bias"):
        width = kw.get("mlp_dim") or 0
        _note(
            notes,
            "mlp_bias (gate, up and down projection biases) is not modeled",
            (2 * width + hidden) * layers,
        )
    q = r.d.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method"):
        _note(
            notes,
            f"the checkpoint is quantized ({q.get('quant_method')}); codesign plans with the "
            "workload's param and compute dtypes",
        )

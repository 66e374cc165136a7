"""Plain data: `ModelConfig` (the architecture) and `Workload` (what is run on it).

Both are frozen, hashable and JSON-round-trippable. They know model *dimensions* only; building the
Flax model is `codesign.models`' job, and the closed-form parameter/FLOP counts live in
`codesign.arithmetic` so that the sharding core and the cost model never import the models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ATTENTION_KINDS = ("mha", "gqa", "mla")
# The FFN's form: "swiglu" is the gated form (gate, up, down: three matrices), "gelu" the plain one (up, down).
FFN_ACTIVATIONS = ("swiglu", "gelu")
# The gated form's gate nonlinearity: silu (SwiGLU, Llama) or gelu (GeGLU, Gemma; tanh approximation).
# Same shapes and matmul FLOPs either way, so everything that sizes or prices the FFN reads only
# `ffn_activation`.
GATE_ACTIVATIONS = ("silu", "gelu")
ROUTERS = ("softmax", "sigmoid")
MOE_ROUTINGS = ("capacity", "dropless")


class ConfigError(ValueError):
    """A model or workload description that cannot be built; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int = 0  # 0 means "same as heads" (MHA)
    head_dim: int = 0  # 0 means hidden // heads
    mlp_dim: int = 0  # dense FFN width (also the first_dense_layers' width in MoE models)
    attention: str = "gqa"
    ffn_activation: str = "swiglu"
    ffn_gate_activation: str = "silu"  # see GATE_ACTIVATIONS; only meaningful for the gated form
    qkv_bias: bool = False
    # One matmul for q, k and v (GQA/MHA): a [d, kv_heads, heads/kv_heads + 2, head_dim] weight whose
    # kv_heads dim shards over tensor like k and v do; each kv group carries its query heads with it.
    fused_qkv: bool = False
    tie_embeddings: bool = False
    # Dropout (GPT-style recipes; Megatron's attention_dropout and hidden_dropout): on the attention
    # probabilities, and on the embedding output and each block's attention and FFN outputs before the
    # residual add. Executed by the train step with layout-independent masks (`models.dropout`).
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # MLA (DeepSeek-V2/V3). q_lora_rank 0 means queries are projected directly.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE. n_routed_experts 0 means a dense model.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_token: int = 0
    moe_mlp_dim: int = 0
    first_dense_layers: int = 0
    router: str = "softmax"
    router_aux_loss_coef: float = 0.01
    capacity_factor: float = 1.25
    # Routing (codesign.models.moe): "capacity" fills capacity_factor slots per expert per routing group
    # and drops the overflow (GShard/Switch); "dropless" never drops (DeepSeek, MegaBlocks).
    moe_routing: str = "capacity"
    # Tokens per routing group; 0 = one sequence. Smaller groups let context parallelism (the sequence
    # axis) shard the dispatch too; a model property, so every layout routes the same way.
    moe_group_tokens: int = 0
    # Node-limited routing (DeepSeek-V3's n_group / topk_group): experts are cut into expert_groups
    # contiguous groups (one per node under expert parallelism) and each token goes to at most
    # groups_per_token of them. 0 = no limit.
    expert_groups: int = 1
    groups_per_token: int = 0
    # Provenance: the published figures this preset must reproduce, and where they come from.
    published_params_total: float = 0.0
    published_params_active: float = 0.0
    # How the publisher counted "active": DeepSeek leaves out the input embedding (36.6B rounds to
    # their "37B"; counting it gives 37.55B, which would round to 38B). Mixtral counts it (12.9B).
    published_active_excludes_embedding: bool = False
    published_rounding: float = 0.0  # half a unit of the published figure's last digit (37B -> 0.5e9)
    source: str = ""
    # What an import left out or approximated (e.g. a Hugging Face feature that changes neither the
    # parameter count nor the FLOPs materially), one sentence each. Provenance: not in the fingerprint.
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.notes, list):  # from JSON
            object.__setattr__(self, "notes", tuple(self.notes))
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.head_dim == 0 and self.heads:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def family(self) -> str:
        return "moe" if self.is_moe else "dense"

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_dense_layers if self.is_moe else 0

    def routing_group(self, seq_len: int) -> int:
        """Tokens per MoE routing group for sequences of seq_len tokens."""
        g = self.moe_group_tokens or seq_len
        if seq_len % g:
            raise ConfigError(
                f"model {self.name!r}: moe_group_tokens={g} does not divide seq_len={seq_len}; "
                "pick a divisor of the sequence length (or 0 for one group per sequence)"
            )
        return g

    def expert_capacity(self, group: int) -> int:
        """Slots per expert per routing group of `group` tokens. Dropless: every token could pick one
        expert (top-k picks distinct experts), so `group` slots never drop; capacity: GShard's
        ceil(k x group x capacity_factor / E)."""
        if self.moe_routing == "dropless":
            return group
        return max(
            1, math.ceil(self.experts_per_token * group * self.capacity_factor / self.n_routed_experts)
        )

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def attn_v_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"model {self.name!r}: {msg}")

        need(self.attention in ATTENTION_KINDS, f"attention={self.attention!r}; use one of {ATTENTION_KINDS}")
        need(
            self.ffn_activation in FFN_ACTIVATIONS,
            f"ffn_activation={self.ffn_activation!r}; use one of {FFN_ACTIVATIONS}",
        )
        need(
            self.ffn_gate_activation in GATE_ACTIVATIONS,
            f"ffn_gate_activation={self.ffn_gate_activation!r}; use one of {GATE_ACTIVATIONS}",
        )
        need(self.router in ROUTERS, f"router={self.router!r}; use one of {ROUTERS}")
        for f in ("vocab_size", "hidden", "layers", "heads"):
            need(getattr(self, f) > 0, f"{f} must be positive")
        need(
            self.heads % self.kv_heads == 0,
            f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}",
        )
        for field in ("attention_dropout", "hidden_dropout"):
            rate = getattr(self, field)
            need(0.0 <= rate < 1.0, f"{field}={rate}; a dropout rate is in [0, 1)")
        need(
            not (self.fused_qkv and self.attention == "mla"),
            "fused_qkv applies to GQA/MHA attention; MLA's projections are low-rank: set fused_qkv=false",
        )
        if self.attention == "mla":
            need(
                self.kv_lora_rank > 0
                and self.qk_rope_head_dim > 0
                and self.qk_nope_head_dim > 0
                and self.v_head_dim > 0,
                "MLA needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim > 0",
            )
        if self.is_moe:
            need(
                0 < self.experts_per_token <= self.n_routed_experts,
                f"experts_per_token={self.experts_per_token} must be in 1..n_routed_experts",
            )
            need(self.moe_mlp_dim > 0, "MoE needs moe_mlp_dim > 0")
            need(
                self.moe_routing in MOE_ROUTINGS,
                f"moe_routing={self.moe_routing!r}; use one of {MOE_ROUTINGS}",
            )
            need(self.moe_group_tokens >= 0, "moe_group_tokens must be >= 0 (0 = one sequence per group)")
            need(
                self.expert_groups >= 1 and self.n_routed_experts % self.expert_groups == 0,
                f"expert_groups={self.expert_groups} must divide n_routed_experts={self.n_routed_experts}",
            )
            per_group = self.n_routed_experts // max(self.expert_groups, 1)
            need(
                0 <= self.groups_per_token <= self.expert_groups
                and (
                    not self.groups_per_token or self.groups_per_token * per_group >= self.experts_per_token
                ),
                f"groups_per_token={self.groups_per_token} must be 0 (no limit) or 1..expert_groups="
                f"{self.expert_groups} with groups_per_token x experts per group >= experts_per_token",
            )
            need(0 <= self.first_dense_layers < self.layers, "first_dense_layers must be < layers")
            # The experts (codesign.models.moe) are SwiGLU only; anything else would be counted one way
            # and built another.
            need(
                self.ffn_activation == "swiglu" and self.ffn_gate_activation == "silu",
                "MoE experts are SwiGLU only; use ffn_activation='swiglu', ffn_gate_activation='silu'",
            )
        if self.dense_layers:
            need(self.mlp_dim > 0, "mlp_dim must be positive for dense FFN layers")

    # -- (de)serialization -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def fingerprint(self) -> str:
        """A stable text key (for caches and checkpoints): every architectural field, provenance excluded.

        Fields added later are left out while at their default, so existing fingerprints (cache keys,
        checkpoint metadata) stay byte-identical.
        """
        d = self.to_json()
        for k in (
            "published_params_total",
            "published_params_active",
            "source",
            "published_active_excludes_embedding",
            "published_rounding",
            "notes",
        ):
            d.pop(k)
        if d["ffn_gate_activation"] == "silu":
            d.pop("ffn_gate_activation")
        if not d["fused_qkv"]:
            d.pop("fused_qkv")
        for field in ("attention_dropout", "hidden_dropout"):  # fingerprints of dropout-free models stay
            if not d[field]:
                d.pop(field)
        return json.dumps(d, sort_keys=True)


WORKLOAD_MODES = ("train", "decode")
# How attention runs: "xla" materializes the B x N x T x S scores; "flash" is a fused flash-attention
# kernel (cuDNN on NVIDIA GPUs, Pallas splash attention on TPU, a plain-JAX blockwise reference on CPU:
# `models.attention`): causal tiles skipped, no score traffic, only the output and the row statistics
# kept for backward; "cudnn" asks for cuDNN's by name (GPU only). The cost model and the compiled
# program both follow it. "auto" (a CLI choice, resolved by `resolve_attention`) is the best the
# platform has.
ATTENTION_IMPLS = ("xla", "cudnn", "flash")
ATTENTION_CHOICES = (*ATTENTION_IMPLS, "auto")
FLASH_IMPLS = frozenset({"cudnn", "flash"})


def resolve_attention(choice: str, platform: str, attention_dropout: float = 0.0) -> str:
    """`--attention` for a platform (gpu, tpu, cpu): `auto` -> flash where a flash kernel exists (GPU,
    TPU), else xla (the CPU's flash path is only a reference for checking numerics); xla for a model
    with attention dropout, which only the XLA kernel runs."""
    if choice not in ATTENTION_CHOICES:
        raise ConfigError(f"--attention {choice!r}; use one of {ATTENTION_CHOICES}")
    if choice == "auto":
        return "flash" if platform in ("gpu", "tpu") and not attention_dropout else "xla"
    return choice


# GEMM precision of the cost model (`--matmul-dtype`): fp8 runs the weight matmuls (and the MoE dispatch)
# in FP8 with BF16 attention core, embedding, LM head, router and norms, as DeepSeek-V3 trains.
MATMUL_DTYPES = ("bf16", "fp8")


# Short names users type, mapped to the dtype names numpy/ml_dtypes know.
_DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "fp8": "float8_e4m3fn",
    "float8": "float8_e4m3fn",
    "fp4": "float4_e2m1fn",
}


def dtype_name(name: str) -> str:
    """The numpy/ml_dtypes name of a dtype name or a short one ("bf16" -> "bfloat16")."""
    return _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())


def dtype_bytes(name: str) -> float:
    """Bytes per element of a dtype name ("bfloat16", "bf16", "fp8", "int4", ...): from the dtype itself
    (numpy + ml_dtypes, which jax ships), so sub-byte types count their real bits."""
    import ml_dtypes
    import numpy as np

    key = dtype_name(name)
    try:
        dt = np.dtype(getattr(ml_dtypes, key)) if hasattr(ml_dtypes, key) else np.dtype(key)
    except TypeError:
        raise ConfigError(
            f"unknown dtype {name!r}; use a numpy/ml_dtypes name such as float32, bfloat16, "
            f"float8_e4m3fn, int8, int4, or a short name ({', '.join(_DTYPE_ALIASES)})"
        ) from None
    for info in (ml_dtypes.finfo, ml_dtypes.iinfo):
        try:
            return info(dt).bits / 8
        except (TypeError, ValueError):
            continue
    return float(dt.itemsize)


@dataclass(frozen=True)
class Workload:
    global_batch: int = 8
    seq_len: int = 2048
    mode: str = "train"
    dtype: str = "bfloat16"  # compute dtype; master params stay float32
    param_dtype: str = "float32"
    attention: str = "xla"  # see ATTENTION_IMPLS
    matmul_dtype: str = "bf16"  # see MATMUL_DTYPES: priced by the cost model; the program runs bf16
    # A master copy of the params in the optimizer, wider than param_dtype (Megatron-LM's fp32 main
    # params beside bf16/fp16 model weights, DeepSeek-V3's FP32 master weights): the optimizer
    # updates it (sharded like its moments under ZeRO), the params are its cast, and the gradients
    # accumulate and reduce once per step in it. None: the optimizer updates the params themselves.
    master_dtype: str | None = None

    def __post_init__(self):
        if self.mode not in WORKLOAD_MODES:
            raise ConfigError(f"workload mode {self.mode!r}; use one of {WORKLOAD_MODES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention implementation {self.attention!r}; use one of {ATTENTION_IMPLS}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"matmul dtype {self.matmul_dtype!r}; use one of {MATMUL_DTYPES}")
        for name in ("global_batch", "seq_len"):  # a plan file or profile may carry any JSON value here
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"workload {name} must be a whole number, not {value!r}")
        if self.global_batch <= 0 or self.seq_len <= 0:
            raise ConfigError(
                f"global_batch ({self.global_batch}) and seq_len ({self.seq_len}) must be positive"
            )
        if self.master_dtype is not None and dtype_bytes(self.master_dtype) <= dtype_bytes(self.param_dtype):
            raise ConfigError(
                f"master_dtype {self.master_dtype} is not wider than param_dtype {self.param_dtype}; "
                f"a master copy needs narrower params (param_dtype bfloat16 or float16), or leave it out"
            )

    @property
    def param_bytes(self) -> float:
        return dtype_bytes(self.param_dtype)

    @property
    def update_dtype(self) -> str:
        """What the optimizer updates (the master copy, else the params), what the gradients accumulate
        and reduce once per step in, and what AdamW keeps its moments in (optax keeps them in the
        dtype of what it updates): the memory model, the closed form and `TrainProgram` all read this
        one property."""
        return self.master_dtype or self.param_dtype

    @property
    def optimizer_state_dtype(self) -> str:
        """AdamW's two moments (`update_dtype`)."""
        return self.update_dtype

    @property
    def update_bytes(self) -> float:
        return dtype_bytes(self.update_dtype)

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def flash(self) -> bool:
        """Whether attention runs as a fused flash kernel (no S x S scores stored or streamed)."""
        return self.attention in FLASH_IMPLS

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["master_dtype"] is None:  # absent, as before the field existed: plan files and cache keys
            del d["master_dtype"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)


def default_workload(
    cfg: ModelConfig, n_devices: int, global_batch: int | None = None, seq_len: int | None = None
) -> Workload:
    """The preset's default workload: 4 sequences per device of 4096 tokens (64 for tiny test models)."""
    tiny = cfg.name.startswith("tiny")
    return Workload(
        global_batch=global_batch or max(8, 4 * n_devices), seq_len=seq_len or (64 if tiny else 4096)
    )

"""Analytic memory per device, and the closed-form param table that the analytic cost model shares.

`param_groups(cfg)` lists every param the Flax models in `codesign.models` build (one layer's shape, its
logical axes, and which stack it lives in); a test pins its total to `arithmetic.param_counts`.
`sharded_params` resolves each through the strategy's rules (non-strict, as the planner does) so that
the shard factor of every param is the one `TrainProgram` would use.

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

import functools
import math
from dataclasses import dataclass

from codesign import axes as A
from codesign.arithmetic import stage_layers
from codesign.compile.report import MemoryStats
from codesign.config import ModelConfig, Workload
from codesign.sharding.rules import default_rules
from codesign.sharding.strategy import Strategy

ACT_BYTES = 2  # bf16 activations
F32 = 4


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
        out = [("attn.wq", (d, n, h), (A.EMBED, A.HEADS, A.HEAD_DIM)),
               ("attn.wk", (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM)),
               ("attn.wv", (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM)),
               ("attn.wo", (n, h, d), (A.HEADS, A.HEAD_DIM, A.EMBED))]
        if cfg.qkv_bias:
            out += [("attn.bq", (n, h), (A.HEADS, A.HEAD_DIM)), ("attn.bk", (k, h), (A.KV_HEADS, A.HEAD_DIM)),
                    ("attn.bv", (k, h), (A.KV_HEADS, A.HEAD_DIM))]
        return out
    qk, rope = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        out = [("attn.wq_a", (d, cfg.q_lora_rank), (A.EMBED, A.Q_LORA)),
               ("attn.q_norm", (cfg.q_lora_rank,), (A.Q_LORA,)),
               ("attn.wq_b", (cfg.q_lora_rank, n, qk), (A.Q_LORA, A.HEADS, A.HEAD_DIM))]
    else:
        out = [("attn.wq", (d, n, qk), (A.EMBED, A.HEADS, A.HEAD_DIM))]
    return out + [
        ("attn.wkv_a", (d, cfg.kv_lora_rank + rope), (A.EMBED, A.KV_LORA)),
        ("attn.kv_norm", (cfg.kv_lora_rank,), (A.KV_LORA,)),
        ("attn.wkv_b", (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim), (A.KV_LORA, A.HEADS, A.HEAD_DIM)),
        ("attn.wo", (n, cfg.v_head_dim, d), (A.HEADS, A.HEAD_DIM, A.EMBED))]


def _mlp(cfg: ModelConfig, prefix: str, width: int) -> list[tuple]:
    d = cfg.hidden
    out = [(f"{prefix}.w_gate", (d, width), (A.EMBED, A.MLP))] if cfg.ffn_activation == "swiglu" else []
    return out + [(f"{prefix}.w_up", (d, width), (A.EMBED, A.MLP)), (f"{prefix}.w_down", (width, d), (A.MLP, A.EMBED))]


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
        moe = [("moe.router", (d, e), (A.EMBED, None)),
               ("moe.w_gate", (e, d, f), (A.EXPERT, A.EMBED, A.MLP)),
               ("moe.w_up", (e, d, f), (A.EXPERT, A.EMBED, A.MLP)),
               ("moe.w_down", (e, f, d), (A.EXPERT, A.MLP, A.EMBED))]
        if cfg.n_shared_experts:
            moe += _mlp(cfg, "moe.shared", f * cfg.n_shared_experts)
        out += [ParamGroup(n, s, lg, "moe") for n, s, lg in common + moe]
    out.append(ParamGroup("embed", (cfg.vocab_size, d), (A.VOCAB, A.EMBED), "global"))
    out.append(ParamGroup("final_norm", (d,), (A.EMBED,), "global"))
    if not cfg.tie_embeddings:
        out.append(ParamGroup("lm_head", (d, cfg.vocab_size), (A.EMBED, A.VOCAB), "global"))
    return tuple(out)


@dataclass(frozen=True)
class ShardedParam:
    group: ParamGroup
    count: float  # copies per device program: layers of its stack (per pipeline stage), 1 for global
    axes: tuple[str, ...]  # mesh axes that shard it (after non-strict resolution)
    shards: int

    @property
    def local_elems(self) -> float:
        return self.group.elems / self.shards


def spmd_sizes(strategy: Strategy) -> dict[str, int]:
    """The SPMD mesh of one pipeline stage: every axis but `pipeline`."""
    return {a: n for a, n in strategy.mesh if a != "pipeline"}


@functools.lru_cache(maxsize=4096)
def sharded_params(cfg: ModelConfig, strategy: Strategy) -> tuple[ShardedParam, ...]:
    rules = default_rules(strategy)
    sizes = spmd_sizes(strategy)
    p = strategy.size("pipeline")
    out = []
    for g in param_groups(cfg):
        spec, _ = rules.resolve(g.logical, g.shape, sizes, path=g.name, strict=False)
        axes = tuple(a for e in spec if e for a in ((e,) if isinstance(e, str) else e))
        count = {"dense": stage_layers(cfg, p)[0], "moe": stage_layers(cfg, p)[1], "global": 1.0}[g.where]
        out.append(ShardedParam(g, count, axes, math.prod(sizes[a] for a in axes)))
    return tuple(out)


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
    pbytes = 2 if workload.param_dtype in ("bfloat16", "bf16") else F32
    grads = local * pbytes * (2 if m > 1 else 1)
    gathered = 0.0
    if sizes["fsdp"] > 1:  # one layer's weights gathered, twice (current + prefetched)
        per_layer = {}
        for sp in params:
            if sp.group.where != "global" and "fsdp" in sp.axes:
                per_layer[sp.group.where] = per_layer.get(sp.group.where, 0.0) + sp.local_elems * sizes["fsdp"]
        gathered = 2 * max(per_layer.values(), default=0.0) * pbytes

    b = workload.global_batch / (sizes["data"] * sizes["fsdp"] * sizes["expert"] * m)
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
    return MemoryEstimate(params=local * pbytes, grads=grads, optimizer=2 * local * F32, gathered=gathered,
                          activations=acts, logits=logits)

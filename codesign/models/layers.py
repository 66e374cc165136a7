"""Transformer building blocks: RMSNorm, RoPE, attention (MHA/GQA/MQA and MLA) and the SwiGLU/GELU FFN.

Params are stored in `param_dtype` (float32 master weights) and cast to the compute `dtype` at use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name as name

from codesign import _compat as C
from codesign import axes as A
from codesign.config import ModelConfig
from codesign.models import dropout as D
from codesign.models.attention import causal_attention
from codesign.sharding.activation import FFN, HEADS, constrain

_init = jax.nn.initializers.normal(stddev=0.02)


def param(
    rngs: nnx.Rngs, shape: tuple[int, ...], logical: tuple[str | None, ...], dtype, init=_init
) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=logical)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, logical: str = A.EMBED):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(logical,))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding over the last dim of x [B, T, N, H] (rotate-half convention)."""
    h = x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    ang = positions[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_core(q, k, v, impl: str, remat: str, dropout_rate: float = 0.0):
    """`causal_attention` with kernel `impl` (`models.attention.KERNELS`), checkpointed by itself under
    Megatron's selective recompute: the backward pass recomputes the scores and softmax (and draws the
    same dropout mask again) from the saved q, k, v instead of storing them."""
    if remat in C.SELECTIVE_REMAT:
        # The dropout draw is an argument, not a closure: a traced value closed over by a checkpoint
        # becomes a constant of its jaxpr, which the 1F1B pipeline's saved VJPs cannot carry between
        # loop iterations (`codesign.pipeline_1f1b`).
        def run(q, k, v, draw):
            with D.scope(draw):
                return causal_attention(q, k, v, impl, dropout_rate)

        core = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
        return core(q, k, v, D.current())
    return causal_attention(q, k, v, impl, dropout_rate)


class Attention(nnx.Module):
    """MHA / GQA / MQA: kv_heads divides heads."""

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str, remat: str = "none"
    ):
        d, n, k, h = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.fused = cfg.fused_qkv
        if self.fused:  # one [d, k, g + 2, h] weight: per kv group, its g query heads, then k, then v
            group = (A.KV_HEADS, A.QKV, A.HEAD_DIM)
            self.wqkv = param(rngs, (d, k, n // k + 2, h), (A.EMBED, *group), param_dtype)
            if cfg.qkv_bias:
                z = jax.nn.initializers.zeros
                self.bqkv = param(rngs, (k, n // k + 2, h), group, param_dtype, z)
        else:
            self.wq = param(rngs, (d, n, h), (A.EMBED, A.HEADS, A.HEAD_DIM), param_dtype)
            self.wk = param(rngs, (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM), param_dtype)
            self.wv = param(rngs, (d, k, h), (A.EMBED, A.KV_HEADS, A.HEAD_DIM), param_dtype)
        self.wo = param(rngs, (n, h, d), (A.HEADS, A.HEAD_DIM, A.EMBED), param_dtype)
        if cfg.qkv_bias and not self.fused:
            z = jax.nn.initializers.zeros
            self.bq = param(rngs, (n, h), (A.HEADS, A.HEAD_DIM), param_dtype, z)
            self.bk = param(rngs, (k, h), (A.KV_HEADS, A.HEAD_DIM), param_dtype, z)
            self.bv = param(rngs, (k, h), (A.KV_HEADS, A.HEAD_DIM), param_dtype, z)
        self.qkv_bias, self.theta, self.dtype, self.impl = cfg.qkv_bias, cfg.rope_theta, dtype, impl
        self.remat, self.dropout = remat, cfg.attention_dropout

    def __call__(self, x, positions):
        return self.attend(self.project(x), positions)

    def project(self, x):
        """The input projections (what reads the block's input x): q, k, v."""
        c = lambda p: p[...].astype(self.dtype)
        if self.fused:
            qkv = jnp.einsum("btd,dkgh->btkgh", x, c(self.wqkv))
            if self.qkv_bias:
                qkv = qkv + c(self.bqkv)
            return split_qkv(name(qkv, C.QKV_PROJ))
        q = jnp.einsum("btd,dnh->btnh", x, c(self.wq))
        k = jnp.einsum("btd,dkh->btkh", x, c(self.wk))
        v = jnp.einsum("btd,dkh->btkh", x, c(self.wv))
        if self.qkv_bias:
            q, k, v = q + c(self.bq), k + c(self.bk), v + c(self.bv)
        return name(q, C.QUERY_PROJ), name(k, C.KEY_PROJ), name(v, C.VALUE_PROJ)

    def attend(self, qkv, positions):
        c = lambda p: p[...].astype(self.dtype)
        q, k, v = qkv
        q = constrain(rope(q, positions, self.theta), HEADS)
        k = constrain(rope(k, positions, self.theta), HEADS)
        v = constrain(v, HEADS)
        o = name(constrain(attention_core(q, k, v, self.impl, self.remat, self.dropout), HEADS), C.CONTEXT)
        return name(jnp.einsum("btnh,nhd->btd", o, c(self.wo)), C.OUT_PROJ)


def split_qkv(qkv):
    """[..., k, g + 2, h] (per kv group: g query heads, k, v) -> q [..., k*g, h], k and v [..., k, h].
    Query head j of group i becomes head i*g + j: the grouping jax.nn.dot_product_attention uses."""
    g = qkv.shape[-2] - 2
    q = qkv[..., :g, :]
    return q.reshape(*q.shape[:-3], q.shape[-3] * g, q.shape[-1]), qkv[..., g, :], qkv[..., g + 1, :]


def fuse_qkv(wq, wk, wv):
    """Separate q [d, n, h], k and v [d, k, h] weights (or biases without d) -> the fused layout
    [d, k, n/k + 2, h]: how a checkpoint saved with separate projections converts (same math)."""
    k, h = wk.shape[-2], wk.shape[-1]
    q = wq.reshape(*wq.shape[:-2], k, wq.shape[-2] // k, h)
    return jnp.concatenate([q, wk[..., None, :], wv[..., None, :]], axis=-2)


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank KV latent plus a shared RoPE key."""

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str, remat: str = "none"
    ):
        d, n = cfg.hidden, cfg.heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        qk = self.nope + self.rope_dim
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), (A.EMBED, A.Q_LORA), param_dtype)
            self.q_norm = RMSNorm(
                cfg.q_lora_rank, cfg.norm_eps, param_dtype=param_dtype, dtype=dtype, logical=A.Q_LORA
            )
            self.wq_b = param(rngs, (cfg.q_lora_rank, n, qk), (A.Q_LORA, A.HEADS, A.HEAD_DIM), param_dtype)
        else:
            self.wq = param(rngs, (d, n, qk), (A.EMBED, A.HEADS, A.HEAD_DIM), param_dtype)
        self.q_lora = cfg.q_lora_rank
        self.wkv_a = param(rngs, (d, self.kv_lora + self.rope_dim), (A.EMBED, A.KV_LORA), param_dtype)
        self.kv_norm = RMSNorm(
            self.kv_lora, cfg.norm_eps, param_dtype=param_dtype, dtype=dtype, logical=A.KV_LORA
        )
        self.wkv_b = param(
            rngs, (self.kv_lora, n, self.nope + self.v_dim), (A.KV_LORA, A.HEADS, A.HEAD_DIM), param_dtype
        )
        self.wo = param(rngs, (n, self.v_dim, d), (A.HEADS, A.HEAD_DIM, A.EMBED), param_dtype)
        self.theta, self.dtype, self.impl, self.remat = cfg.rope_theta, dtype, impl, remat
        self.dropout = cfg.attention_dropout

    def __call__(self, x, positions):
        return self.attend(self.project(x), positions)

    def project(self, x):
        """The projections: q, the key/value latent with the shared RoPE key, and the up-projected keys
        and values. Every projection of a branch carries the branch's name, so a policy that saves
        q/k/v recomputes none of MLA's low-rank matmuls either."""
        c = lambda p: p[...].astype(self.dtype)
        if self.q_lora:
            q_a = name(jnp.einsum("btd,dr->btr", x, c(self.wq_a)), C.QUERY_PROJ)
            q = jnp.einsum("btr,rnh->btnh", self.q_norm(q_a), c(self.wq_b))
        else:
            q = jnp.einsum("btd,dnh->btnh", x, c(self.wq))
        kv = name(jnp.einsum("btd,dr->btr", x, c(self.wkv_a)), C.KEY_PROJ)
        kv_up = jnp.einsum("btr,rnh->btnh", self.kv_norm(kv[..., : self.kv_lora]), c(self.wkv_b))
        return name(q, C.QUERY_PROJ), kv, name(kv_up, C.KEY_PROJ)

    def attend(self, proj, positions):
        c = lambda p: p[...].astype(self.dtype)
        q, kv, kv_up = proj
        q_nope, q_rope = q[..., : self.nope], q[..., self.nope :]
        k_rope = rope(kv[:, :, None, self.kv_lora :], positions, self.theta)  # one RoPE key for all heads
        k_nope, v = kv_up[..., : self.nope], kv_up[..., self.nope :]
        q = constrain(jnp.concatenate([q_nope, rope(q_rope, positions, self.theta)], axis=-1), HEADS)
        k = constrain(
            jnp.concatenate(
                [k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:-1] + (self.rope_dim,))], axis=-1
            ),
            HEADS,
        )
        o = attention_core(q, k, constrain(v, HEADS), self.impl, self.remat, self.dropout)
        o = constrain(o, HEADS)
        return name(jnp.einsum("btnh,nhd->btd", name(o, C.CONTEXT), c(self.wo)), C.OUT_PROJ)


class MLP(nnx.Module):
    """Gated (gate, up, down: SwiGLU, or GeGLU when ffn_gate_activation='gelu') or GELU (up, down) FFN."""

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden
        self.gated = cfg.ffn_activation == "swiglu"
        if self.gated:
            self.w_gate = param(rngs, (d, width), (A.EMBED, A.MLP), param_dtype)
        self.w_up = param(rngs, (d, width), (A.EMBED, A.MLP), param_dtype)
        self.w_down = param(rngs, (width, d), (A.MLP, A.EMBED), param_dtype)
        self.gate_gelu = cfg.ffn_gate_activation == "gelu"
        self.dtype = dtype

    def __call__(self, x):
        return self.finish(self.project(x))

    def project(self, x):
        """The input projections: (gate, up), or (up,) ungated."""
        c = lambda p: p[...].astype(self.dtype)
        up = name(jnp.einsum("btd,df->btf", x, c(self.w_up)), C.MLP_WI_1 if self.gated else C.MLP_WI)
        if not self.gated:
            return (up,)
        return name(jnp.einsum("btd,df->btf", x, c(self.w_gate)), C.MLP_WI_0), up

    def finish(self, proj):
        c = lambda p: p[...].astype(self.dtype)
        if self.gated:
            act = jax.nn.gelu if self.gate_gelu else jax.nn.silu
            h = act(proj[0]) * proj[1]
        else:
            h = jax.nn.gelu(proj[0])
        h = constrain(h, FFN)
        return name(jnp.einsum("btf,fd->btd", h, c(self.w_down)), C.MLP_WO)

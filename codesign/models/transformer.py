"""The decoder-only transformer: embed -> scanned blocks -> norm -> LM head.

Layers of one kind are stacked (a leading `layers` axis on every param) and run with
`jax.lax.scan`, so XLA compiles one layer body however deep the model is. MoE models keep two
stacks: the first `first_dense_layers` dense blocks, then the MoE blocks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from codesign import _compat
from codesign import axes as A
from codesign.config import ModelConfig
from codesign.models import dropout as D
from codesign.models.layers import MLP, Attention, MLAttention, RMSNorm, param
from codesign.models.moe import MoE
from codesign.sharding.activation import GATHERED, LOGITS, RESIDUAL, constrain


class Block(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs, dtype, param_dtype, impl, remat="none"
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, **kw)
        attn_cls = MLAttention if cfg.attention == "mla" else Attention
        self.attn = attn_cls(cfg, rngs=rngs, impl=impl, remat=remat, **kw)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, **kw)
        self.ffn = MoE(cfg, rngs=rngs, **kw) if moe else MLP(cfg, cfg.mlp_dim, rngs=rngs, **kw)
        self.moe, self.remat, self.dropout = moe, remat, cfg.hidden_dropout

    def _project(self, project, h):
        """The input projections of a tensor-parallel block applied to the normed residual h, laid out
        as the block reads it (GATHERED). Under selective recompute only the projections' outputs are
        kept: backward all-gathers the sequence-sharded h again instead of storing the gathered copy
        (Megatron's sequence parallelism). Without sp the layout is a no-op."""

        def run(y):
            return project(constrain(y, GATHERED))

        if self.remat in _compat.SELECTIVE_REMAT:
            keep = jax.checkpoint_policies.save_only_these_names(*_compat.PROJ_NAMES)
            run = jax.checkpoint(run, policy=keep, prevent_cse=False)
        return run(h)

    def __call__(self, x, positions):
        # The norms run on the residual's layout (under sp: their 1/tensor of the positions); then the
        # block's input is gathered.
        h = constrain(self.attn_norm(x), RESIDUAL)
        a = self.attn.attend(self._project(self.attn.project, h), positions)
        x = constrain(x + D.dropout(a, self.dropout, D.ATTENTION_OUT), RESIDUAL)
        h = constrain(self.ffn_norm(x), RESIDUAL)
        if self.moe:  # the MoE block reads its gathered input in its router, dispatch and shared expert
            h = self.ffn(constrain(h, GATHERED))
        else:
            h = self.ffn.finish(self._project(self.ffn.project, h))
        h, aux = h if self.moe else (h, jnp.zeros((), jnp.float32))
        return constrain(x + D.dropout(h, self.dropout, D.FFN_OUT), RESIDUAL), aux


def _stack(cfg, n: int, moe: bool, rngs: nnx.Rngs, **kw) -> Block:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: A.LAYERS})
    def make(r):
        return Block(cfg, moe, rngs=r, **kw)

    return make(rngs)


class Transformer(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        remat: str = "full",
        attention_impl: str = "xla",  # a kernel of models.attention.KERNELS
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "impl": attention_impl, "remat": remat}
        self.embed = param(
            rngs,
            (cfg.vocab_size, cfg.hidden),
            (A.VOCAB, A.EMBED),
            param_dtype,
            jax.nn.initializers.normal(1.0),
        )
        self.dense_blocks = _stack(cfg, cfg.dense_layers, False, rngs, **kw) if cfg.dense_layers else None
        self.moe_blocks = _stack(cfg, cfg.moe_layers, True, rngs, **kw) if cfg.moe_layers else None
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden, cfg.vocab_size), (A.EMBED, A.VOCAB), param_dtype)
        self.cfg, self.dtype, self.remat = cfg, dtype, remat

    def _run_stack(self, blocks, x, positions, first_layer: int):
        graphdef, state = nnx.split(blocks)
        return run_layers(graphdef, state, x, positions, self.remat, first_layer=first_layer)

    def embed_tokens(self, tokens):
        """tokens int [B, T] -> the residual stream [B, T, D] entering the first block."""
        return enter_residual(self.embed[...].astype(self.dtype)[tokens], self.dtype, self.cfg.hidden_dropout)

    def head(self, x):
        """The residual stream after the last block [B, T, D] -> logits float32 [B, T, vocab]."""
        x = constrain(self.final_norm(x), GATHERED)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype))
        logits = constrain(logits, LOGITS)
        return logits.astype(jnp.float32)

    def __call__(self, tokens):
        """tokens int [B, T] -> (logits float32 [B, T, vocab], MoE aux loss summed over layers)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed_tokens(tokens)
        aux = jnp.zeros((), jnp.float32)
        for blocks, first in ((self.dense_blocks, 0), (self.moe_blocks, self.cfg.dense_layers)):
            if blocks is not None:
                x, a = self._run_stack(blocks, x, positions, first)
                aux = aux + a
        return self.head(x), aux


def enter_residual(rows, dtype, dropout_rate: float):
    """Looked-up embedding rows [B, T, D] -> the residual stream entering the first block (dropout,
    then the residual's layout)."""
    x = rows.astype(dtype)
    return constrain(D.dropout(x, dropout_rate, D.EMBEDDING), RESIDUAL)


def run_layers(graphdef, layers, x, positions, remat: str, valid=None, *, first_layer=0, layer_ids=None):
    """Scan a stack of blocks (`layers`: the stacked state, leading `layers` axis) over x.

    `valid` (bool [layers], optional) marks padding layers of an uneven pipeline split: a layer whose
    flag is False passes x through unchanged and adds no aux loss. Each layer draws its dropout masks
    with its model-wide index: `layer_ids` (int [layers]) or first_layer + its place in the stack.
    Returns (x, aux summed)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    ids = first_layer + jnp.arange(n) if layer_ids is None else layer_ids
    draw = D.current()  # passed to each layer as arguments, so a rerun layer draws the same masks

    def layer(layer_state, h, positions, layer_draw):
        with D.scope(layer_draw):
            return nnx.merge(graphdef, layer_state)(h, positions)

    if remat in _compat.WHOLE_LAYER_REMAT:
        layer = rerun_whole_forward(layer)

    def body(carry, xs):
        h, aux = carry
        layer_state, ok, i = xs
        out, a = layer(layer_state, h, positions, D.layer_key(draw, i))
        if ok is not None:
            out, a = jnp.where(ok, out, h), jnp.where(ok, a, 0.0)
        return (out, aux + a), None

    policy = _compat.remat_policy(remat)
    # none and selective keep the layer's activations (selective: Block._project, attention_core)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    (x, aux), _ = jax.lax.scan(body, (x, jnp.zeros((), jnp.float32)), (layers, valid, ids))
    return x, aux


def rerun_whole_forward(f):
    """f(*args) saving only its inputs, with a backward that reruns all of f's forward before its VJP,
    the outputs backward does not need included (PyTorch activation checkpointing; Megatron-LM's full
    recompute). Under jax.checkpoint, XLA drops those outputs as dead code (the FFN down-projection
    and its tensor all-reduce): adding 0 x the rerun output to the cotangent keeps them live (XLA does
    not fold a float multiply by zero; an optimization barrier alone is pruned)."""

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def fwd(*args):
        return f(*args), args

    def bwd(args, ct):
        out, vjp = jax.vjp(f, *args)
        return vjp(jax.tree.map(lambda c, o: c + jnp.zeros_like(c) * o.astype(c.dtype), ct, out))

    g.defvjp(fwd, bwd)
    return g


def build_model(cfg: ModelConfig, seed: int = 0, **kw: Any) -> Transformer:
    """A concrete model (weights allocated on the default device). Logical axes in metadata only."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(seed), **kw)


def build_abstract(cfg: ModelConfig, **kw: Any) -> Transformer:
    """The model as ShapeDtypeStructs: no weights allocated, logical axes on every param."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), **kw))

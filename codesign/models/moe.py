"""Mixture-of-experts FFN: router with a load-balancing loss, capacity-based gather dispatch.

Dispatch choice (and why): each sequence is a routing *group*. Inside a group, tokens are placed
into per-expert slots of fixed capacity C = ceil(k * S * capacity_factor / E) by index arithmetic
(top-k -> cumulative position -> scatter of token ids) and moved with a *gather*, not with
GShard's one-hot dispatch einsum. The gather costs no FLOPs, where the one-hot einsum would cost
2*S*E*C*d per group (for DeepSeek-V3 at S=4096 that is several times the experts' own work, which
would corrupt every FLOP count the planner reads). The dispatched tensor [G, E, C, d] is then
re-constrained from group-sharded to expert-sharded, which XLA lowers to an all-to-all over the
expert mesh axis, the collective expert parallelism is meant to pay. Tokens over capacity are
dropped (their residual passes through), as in GShard/Switch. Groups are batch rows, so the
routing does not depend on the layout: every layout computes the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name as name

from codesign import _compat as C
from codesign import axes as A
from codesign.config import ModelConfig
from codesign.models.layers import MLP, param
from codesign.sharding.activation import constrain


def select_experts(probs, cfg: ModelConfig):
    """probs [..., E] -> expert indices [..., k]. Plain top-k, or node-limited (DeepSeek-V3): score each
    of the expert_groups groups by the sum of its top k/M affinities, keep the M best groups, then
    take the top k experts inside them. Top-k is a sort along the expert axis: XLA's TopK op is not
    partitioned along the batch (on CPU it all-gathers the router probabilities of every shard)."""
    e, k, m = cfg.n_routed_experts, cfg.experts_per_token, cfg.groups_per_token
    if m and m < cfg.expert_groups:
        ng = cfg.expert_groups
        per_group = jnp.sort(probs.reshape(*probs.shape[:-1], ng, e // ng), axis=-1)
        group_score = jnp.sum(per_group[..., -max(1, k // m) :], axis=-1)  # [..., ng]
        keep = jnp.argsort(-group_score, axis=-1, stable=True)[..., :m]
        allowed = jnp.sum(jax.nn.one_hot(keep, ng, dtype=jnp.int32), axis=-2) > 0  # [..., ng]
        allowed = jnp.repeat(allowed, e // ng, axis=-1)
        probs = jnp.where(allowed, probs, -1.0)  # affinities are >= 0: excluded experts sort last
    return jnp.argsort(-probs, axis=-1, stable=True)[..., :k]


def _route_one_group(expert_idx, n_experts: int, capacity: int):
    """expert_idx [S, k] -> (slot [k, S] into an E*C(+1 dump) table, token table [E*C])."""
    s, k = expert_idx.shape
    flat = expert_idx.T.reshape(-1)  # choice-major: every token's first choice beats any second choice
    onehot = jax.nn.one_hot(flat, n_experts, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    dump = n_experts * capacity
    slot = jnp.where(pos < capacity, flat * capacity + pos, dump)
    token = jnp.tile(jnp.arange(s), k)
    table = jnp.full((dump + 1,), s, jnp.int32).at[slot].set(token)[:dump]
    return slot.reshape(k, s), table


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, e, f = cfg.hidden, cfg.n_routed_experts, cfg.moe_mlp_dim
        self.router = param(rngs, (d, e), (A.EMBED, None), param_dtype)
        self.w_gate = param(rngs, (e, d, f), (A.EXPERT, A.EMBED, A.MLP), param_dtype)
        self.w_up = param(rngs, (e, d, f), (A.EXPERT, A.EMBED, A.MLP), param_dtype)
        self.w_down = param(rngs, (e, f, d), (A.EXPERT, A.MLP, A.EMBED), param_dtype)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, f * cfg.n_shared_experts, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.has_shared = bool(cfg.n_shared_experts)
        self.cfg, self.dtype = cfg, dtype

    def __call__(self, x):
        """x [B, S, d] -> (y [B, S, d], load-balancing aux loss scalar)."""
        cfg, c = self.cfg, (lambda p: p[...].astype(self.dtype))
        b, s, d = x.shape
        e, k = cfg.n_routed_experts, cfg.experts_per_token
        gs = cfg.routing_group(s)
        n, cap = s // gs, cfg.expert_capacity(gs)
        # Routing groups [B, n, gs]: the batch axes shard B, context parallelism shards n, so every
        # batch-like axis divides the dispatch and the expert work.
        xg = constrain(x.reshape(b, n, gs, d), (A.ACT_BATCH, A.ACT_SEQ, None, A.ACT_EMBED))

        logits = jnp.einsum("bngd,de->bnge", xg, c(self.router)).astype(jnp.float32)
        probs = jax.nn.sigmoid(logits) if cfg.router == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        idx = select_experts(probs, cfg)  # [B, n, gs, k]
        gates = jnp.take_along_axis(probs, idx, axis=-1)
        if cfg.router == "sigmoid" or k > 1:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)

        # Switch-style balance loss per group, E * sum_e (share of slots to e) * (mean prob of e),
        # averaged over groups (as GShard). Per-group statistics reduce locally; a global mean made
        # XLA all-gather the router probabilities across batch shards.
        share = jnp.mean(jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2), axis=2) / k
        mean_prob = jnp.mean(probs / jnp.sum(probs, axis=-1, keepdims=True), axis=2)  # [B, n, E]
        aux = e * jnp.mean(jnp.sum(share * mean_prob, axis=-1))

        per_group = jax.vmap(jax.vmap(lambda i: _route_one_group(i, e, cap)))
        slot, table = per_group(idx)  # [B, n, k, gs], [B, n, E*C]
        x_pad = jnp.concatenate([xg, jnp.zeros((b, n, 1, d), x.dtype)], axis=2)
        x_disp = jax.vmap(jax.vmap(lambda xp, t: xp[t]))(x_pad, table).reshape(b, n, e, cap, d)
        x_disp = constrain(x_disp, (A.ACT_BATCH, A.ACT_SEQ, None, None, A.ACT_EMBED))
        # Group-sharded -> expert-sharded: the all-to-all of expert parallelism.
        x_e = constrain(jnp.moveaxis(x_disp, 2, 0), (A.ACT_EXPERT, A.ACT_BATCH, A.ACT_SEQ, None, A.ACT_EMBED))
        h = jax.nn.silu(name(jnp.einsum("ebncd,edf->ebncf", x_e, c(self.w_gate)), C.MLP_WI_0)) * name(
            jnp.einsum("ebncd,edf->ebncf", x_e, c(self.w_up)), C.MLP_WI_1
        )
        h = constrain(h, (A.ACT_EXPERT, A.ACT_BATCH, A.ACT_SEQ, None, A.ACT_MLP))
        y_e = name(jnp.einsum("ebncf,efd->ebncd", h, c(self.w_down)), C.MLP_WO)
        y_e = constrain(y_e, (A.ACT_EXPERT, A.ACT_BATCH, A.ACT_SEQ, None, A.ACT_EMBED))
        y_disp = constrain(
            jnp.moveaxis(y_e, 0, 2), (A.ACT_BATCH, A.ACT_SEQ, None, None, A.ACT_EMBED)
        )  # back: all-to-all

        y_flat = jnp.concatenate(
            [y_disp.reshape(b, n, e * cap, d), jnp.zeros((b, n, 1, d), y_disp.dtype)], axis=2
        )
        picked = jax.vmap(jax.vmap(lambda yf, sl: yf[sl]))(y_flat, slot)  # [B, n, k, gs, d]; dropped: 0
        y = jnp.einsum("bnkgd,bngk->bngd", picked, gates.astype(picked.dtype)).reshape(b, s, d)
        if self.has_shared:
            y = y + self.shared(x)
        return y, aux

"""Forward shapes for each attention and FFN kind, and causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codesign.models import build_model
from codesign.presets import get_preset

VARIANTS = {
    "gqa": get_preset("tiny-dense"),
    "mha": get_preset("tiny-dense").replace(kv_heads=8, attention="mha"),
    "mqa": get_preset("tiny-dense").replace(kv_heads=1),
    "gelu-tied": get_preset("tiny-dense").replace(ffn_activation="gelu", tie_embeddings=True),
    "qkv-bias": get_preset("tiny-dense").replace(qkv_bias=True),
    "mla": get_preset("tiny-mla"),
    "mla-no-qlora": get_preset("tiny-mla").replace(q_lora_rank=0),
    "moe-deepseek": get_preset("tiny-moe"),
    "moe-mixtral": get_preset("tiny-moe").replace(n_shared_experts=0, first_dense_layers=0, mlp_dim=0),
    "moe-sigmoid": get_preset("tiny-moe").replace(router="sigmoid"),
}


@pytest.mark.parametrize("kind", VARIANTS)
def test_forward_shapes(kind):
    cfg = VARIANTS[kind]
    model = build_model(cfg, dtype=jnp.float32, remat="none")
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)), jnp.int32)
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    if cfg.is_moe:
        assert float(aux) > 0  # the balance loss is live
    else:
        assert float(aux) == 0


@pytest.mark.parametrize("kind", ["gqa", "mla", "moe-deepseek"])
def test_causality(kind):
    """d loss(position t) / d embedding(token s) is zero for every s > t."""
    cfg = VARIANTS[kind]
    model = build_model(cfg, dtype=jnp.float32, remat="none")
    t_len, t = 12, 5
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, t_len)), jnp.int32)
    table = model.embed[...]
    onehot = jax.nn.one_hot(tokens, cfg.vocab_size)

    def loss_at_t(x_emb):
        logits = _forward_from_embeddings(model, x_emb)
        return jax.nn.log_softmax(logits[0, t])[0]

    emb = onehot @ table
    g = jax.jit(jax.grad(loss_at_t))(emb)
    per_pos = jnp.abs(g[0]).sum(-1)
    assert float(per_pos[: t + 1].sum()) > 0
    np.testing.assert_array_equal(np.asarray(per_pos[t + 1:]), 0.0)


def _forward_from_embeddings(model, x):
    """The model's forward pass with the embedding lookup replaced by given embeddings."""
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    for blocks in (model.dense_blocks, model.moe_blocks):
        if blocks is not None:
            x, _ = model._run_stack(blocks, x, positions)
    x = model.final_norm(x)
    head = model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...]
    return x @ head


def test_remat_policies_compute_the_same_loss():
    cfg = get_preset("tiny-dense")
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 16)), jnp.int32)
    outs = []
    for remat in ("none", "full", "dots", "dots_nobatch"):
        model = build_model(cfg, dtype=jnp.float32, remat=remat)
        outs.append(nnx.jit(nnx.grad(lambda m: m(tokens)[0].mean()))(model)["embed"][...])
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), rtol=1e-5, atol=1e-7)

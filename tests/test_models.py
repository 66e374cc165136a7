"""Forward shapes for each attention and FFN kind, and causality."""

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
    """The real forward pass: changing tokens after position t leaves every logit up to t unchanged,
    and changing the token at t changes them."""
    cfg = VARIANTS[kind]
    if cfg.is_moe:  # a capacity that drops nothing: dropping depends on the whole group, by design
        cfg = cfg.replace(capacity_factor=float(cfg.n_routed_experts))
    model = build_model(cfg, dtype=jnp.float32, remat="none")
    forward = nnx.jit(lambda m, x: m(x)[0])
    t_len, t = 12, 5
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, cfg.vocab_size, (1, t_len))
    future = tokens.copy()
    future[0, t + 1 :] = (
        tokens[0, t + 1 :] + 1 + rng.randint(0, cfg.vocab_size - 1, t_len - t - 1)
    ) % cfg.vocab_size
    present = tokens.copy()
    present[0, t] = (tokens[0, t] + 1) % cfg.vocab_size
    base, fut, pres = (
        np.asarray(forward(model, jnp.asarray(x, jnp.int32))) for x in (tokens, future, present)
    )
    np.testing.assert_allclose(fut[0, : t + 1], base[0, : t + 1], rtol=1e-6, atol=1e-6)
    assert np.abs(fut[0, t + 1 :] - base[0, t + 1 :]).max() > 1e-4  # the future did change
    assert np.abs(pres[0, t] - base[0, t]).max() > 1e-4
    np.testing.assert_allclose(pres[0, :t], base[0, :t], rtol=1e-6, atol=1e-6)


def test_remat_policies_compute_the_same_loss():
    cfg = get_preset("tiny-dense")
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 16)), jnp.int32)
    outs = []
    for remat in ("none", "full", "dots", "dots_nobatch"):
        model = build_model(cfg, dtype=jnp.float32, remat=remat)
        outs.append(nnx.jit(nnx.grad(lambda m: m(tokens)[0].mean()))(model)["embed"][...])
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), rtol=1e-5, atol=1e-7)

"""MoE routing (dropless, capacity, node-limited) and how the dispatch scales with the batch axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codesign.closed_form import analytic_report, moe_slots, shape_of
from codesign.compile.hlo import analyze_hlo
from codesign.config import ConfigError, Workload
from codesign.models.moe import MoE, select_experts
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.train_step import TrainProgram
from tests.conftest import initial_state, require_devices

TINY = get_preset("tiny-moe")


def _layer(cfg) -> MoE:
    with nnx.use_eager_sharding(False):
        return MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


def _moe_out(cfg, x):
    return _layer(cfg)(x)


def _max_load(cfg, x) -> int:
    """The most slots any expert needs in any routing group of x (what capacity must cover)."""
    logits = jnp.einsum("bsd,de->bse", x, _layer(cfg).router[...])
    idx = select_experts(jax.nn.softmax(logits, axis=-1), cfg)  # [B, S, k]
    counts = jax.nn.one_hot(idx, cfg.n_routed_experts).sum(axis=(1, 2))  # one group per row
    return int(counts.max())


def test_dropless_and_capacity_agree_when_nothing_is_dropped():
    x = jax.random.normal(jax.random.key(1), (4, 16, TINY.hidden), jnp.float32)
    dropless = TINY.replace(moe_routing="dropless")
    load = _max_load(dropless, x)
    e, k, s = TINY.n_routed_experts, TINY.experts_per_token, 16
    assert TINY.replace(capacity_factor=load * e / (k * s)).expert_capacity(s) == load < s
    y_free, aux_free = _moe_out(dropless, x)
    y_cap, aux_cap = _moe_out(TINY.replace(capacity_factor=load * e / (k * s)), x)
    np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_free), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux_cap), float(aux_free), rtol=1e-6)
    # One slot fewer drops a token: the check above can fail.
    y_short, _ = _moe_out(TINY.replace(capacity_factor=(load - 1) * e / (k * s)), x)
    assert not np.allclose(np.asarray(y_short), np.asarray(y_free), atol=1e-6)


@pytest.mark.slow  # the layer-level test above checks the same property in a fraction of the time
def test_dropless_train_loss_matches_capacity_without_drops():
    """The same through the whole train step on 8 devices (expert parallelism)."""
    require_devices(8)
    wl, s = Workload(global_batch=8, seq_len=16, dtype="float32"), Strategy.parse("data=2,expert=4")
    tokens = np.random.RandomState(0).randint(0, TINY.vocab_size, (8, 17)).astype(np.int32)
    losses = []
    e, k = TINY.n_routed_experts, TINY.experts_per_token
    for cfg in (TINY.replace(moe_routing="dropless"), TINY.replace(capacity_factor=e / k)):
        prog = TrainProgram(cfg, wl, s, MeshSpec.from_strategy(s).build(jax.devices()))
        _, metrics = prog.step_fn(
            initial_state(prog), jax.device_put(jnp.asarray(tokens), prog.batch_sharding)
        )
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def _groups_hit(idx, cfg) -> np.ndarray:
    per = cfg.n_routed_experts // cfg.expert_groups
    g = np.asarray(idx) // per
    return np.array([len(set(row)) for row in g.reshape(-1, g.shape[-1])])


def test_node_limited_routing_never_exceeds_m_groups():
    cfg = TINY.replace(n_routed_experts=16, experts_per_token=4, expert_groups=8, groups_per_token=2)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (64, 32, 16)), axis=-1)
    limited = select_experts(probs, cfg)
    assert _groups_hit(limited, cfg).max() <= 2
    assert _groups_hit(select_experts(probs, cfg.replace(groups_per_token=0)), cfg).max() > 2
    # DeepSeek's rule: the kept groups are those with the largest sum of their top k/M affinities.
    p = np.asarray(probs).reshape(-1, 8, 2)
    score = np.sort(p, axis=-1)[..., -2:].sum(-1)
    best = np.argsort(-score, axis=-1, kind="stable")[:, :2]
    got = np.asarray(limited).reshape(-1, 4) // 2
    for row_best, row_got in zip(best, got):
        assert set(row_got) <= set(row_best)


def test_node_limited_needs_enough_experts():
    with pytest.raises(ConfigError, match="groups_per_token"):
        TINY.replace(expert_groups=4, groups_per_token=5)
    with pytest.raises(ConfigError, match="moe_group_tokens"):
        TINY.replace(moe_group_tokens=7).routing_group(32)


def test_closed_form_dispatch_shrinks_with_every_batch_axis():
    cfg = TINY.replace(moe_group_tokens=8)
    wl = Workload(global_batch=8, seq_len=32)

    def slots(spec):
        return moe_slots(cfg, shape_of(cfg, wl, Strategy.parse(spec)))

    assert slots("data=4,expert=2") == pytest.approx(slots("data=2,expert=2") / 2)
    assert slots("fsdp=2,expert=2") == pytest.approx(slots("expert=2") / 2)
    assert slots("sequence=2,expert=2") == slots("data=2,expert=2")  # context parallelism counts too
    one, two = (
        analytic_report(cfg, wl, Strategy.parse(s), platform="cpu").matmul_flops
        for s in ("data=2,expert=2", "data=4,expert=2")
    )
    assert two == pytest.approx(one / 2, rel=0.01)


@pytest.mark.slow
def test_compiled_dispatch_flops_halve_when_data_doubles():
    require_devices(8)
    cfg = TINY.replace(moe_group_tokens=8)
    wl = Workload(global_batch=8, seq_len=32)
    flops = {}
    for spec in ("data=1,expert=4", "data=2,expert=4"):
        s = Strategy.parse(spec)
        prog = TrainProgram(cfg, wl, s, MeshSpec.from_strategy(s).build(jax.devices()))
        flops[spec] = analyze_hlo(prog.lower().compile().as_text(), s.mesh).matmul_flops
        closed = analytic_report(cfg, wl, s, platform="cpu").matmul_flops
        assert closed == pytest.approx(flops[spec], rel=0.05)
    assert flops["data=2,expert=4"] == pytest.approx(flops["data=1,expert=4"] / 2, rel=0.02)


def test_deepseek_v3_routes_node_limited_from_preset_and_hf_config():
    from codesign.model_io import load_model_config
    from tests.test_hf_import import _path

    for cfg in (get_preset("deepseek-v3"), load_model_config(_path("deepseek-v3"))):
        assert (cfg.expert_groups, cfg.groups_per_token) == (8, 4)


# -- the cost side at DeepSeek-V3 scale (closed form only: microseconds) ---------------------------
DS_SPEC = "pipeline=16,schedule=dualpipe,expert=64,data=2,zero=1,microbatches=120,remat=none"


def _ds(spec=DS_SPEC, matmul_dtype="bf16", **model):
    from codesign.cost.estimate import estimate_analytic
    from codesign.hardware import load_hardware

    cfg = get_preset("deepseek-v3").replace(capacity_factor=1.0, **model)
    wl = Workload(global_batch=15360, seq_len=4096, matmul_dtype=matmul_dtype)
    s = Strategy.parse(spec)
    rep = analytic_report(cfg, wl, s, platform="gpu")
    return rep, estimate_analytic(cfg, wl, s, load_hardware("h800", devices=2048))


def test_fp8_prices_gemms_dispatch_and_quantization():
    bf, e_bf = _ds()
    f8, e_f8 = _ds(matmul_dtype="fp8")
    assert f8.matmul_flops == bf.matmul_flops  # same work, faster rate
    assert e_f8.compute_s < e_bf.compute_s
    assert f8.bytes_accessed > bf.bytes_accessed  # quantize passes and scales
    a2a = {(c.dtype, c.count): c.bytes for c in f8.collectives if c.kind == "all-to-all"}
    disp, comb = a2a[("fp8", 960)], a2a[("bf16", 960)]
    assert disp == pytest.approx(comb * (1 + 4 / 128) / 2)  # e4m3 + one f32 scale per 128 values
    assert any("fp8" in r and "weight GEMMs" in r for r in e_f8.reasons)
    with pytest.raises(ConfigError, match="matmul dtype"):
        Workload(matmul_dtype="int4")


def test_node_limit_and_dualpipe_hide_the_expert_all_to_all():
    _, limited = _ds()
    _, plain = _ds(groups_per_token=0)
    assert limited.collective_s["all-to-all"] < 0.75 * plain.collective_s["all-to-all"]
    _, one_f_one_b = _ds(DS_SPEC.replace("dualpipe", "1f1b"))
    assert (
        limited.exposed_collective_s
        < one_f_one_b.exposed_collective_s - 0.5 * limited.collective_s["all-to-all"]
    )
    assert any("compute:comm" in r and "dualpipe hides" in r for r in limited.reasons)
    assert any("compute:comm" in r and "exposed" in r for r in one_f_one_b.reasons)


def test_cli_takes_matmul_dtype(capsys):
    import json

    from codesign.cli import main

    argv = [
        "compile",
        "--model",
        "tiny-moe",
        "--hardware",
        "h100",
        "--devices",
        "8",
        "--strategy",
        "expert=8",
    ]
    argv += ["--target", "analytic", "--json"]
    assert main([*argv, "--matmul-dtype", "fp8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any("fp8" in r for r in doc["reasons"])


def test_sweep_knobs_for_fp8_and_node_limit():
    from codesign.explore.sweep import SweepError, _workload_at, apply_model, parse_vary

    assert parse_vary(["node_limit=0,4", "dtype=bf16,fp8"]) == {
        "node_limit": [0, 4],
        "dtype": ["bf16", "fp8"],
    }
    ds = get_preset("deepseek-v3")
    assert apply_model(ds, {"node_limit": 2}).groups_per_token == 2
    assert apply_model(ds, {"node_limit": 0}).groups_per_token == 0
    with pytest.raises(SweepError, match="MoE"):
        apply_model(get_preset("tiny-dense"), {"node_limit": 2})
    wl = Workload()
    assert _workload_at(wl, {"dtype": "fp8"}).matmul_dtype == "fp8"
    assert _workload_at(wl, {"dtype": "fp8"}).dtype == wl.dtype  # activations stay bf16

"""Strategy specs, strict rules, enumeration and describe()."""

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codesign.config import Workload
from codesign.presets import get_preset
from codesign.sharding.describe import describe
from codesign.sharding.enumerate import enumerate_strategies
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.rules import Rules, RulesError, default_rules
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.train_step import TrainProgram


def test_spec_roundtrip_and_json():
    s = Strategy.parse("data=2,fsdp=16,tensor=8,remat=dots,microbatches=4")
    assert s.n_devices == 256 and s.sizes["fsdp"] == 16 and s.remat == "dots" and s.microbatches == 4
    assert Strategy.parse(s.spec) == s
    assert Strategy.from_json(s.to_json()) == s
    assert hash(s) == hash(Strategy.parse(s.spec))
    o = Strategy.parse("tensor=8,data=2,order=tensor.data")
    assert o.order[:2] == ("tensor", "data") and Strategy.parse(o.spec) == o


def test_pipeline_schedule_keys():
    s = Strategy.parse("pipeline=4,tensor=2,stages_per_device=3,microbatches=8")
    assert s.schedule == "interleaved" and s.stages_per_device == 3 and s.stage_chunks == 12
    assert Strategy.parse(s.spec) == s == Strategy.from_json(s.to_json())
    assert Strategy.parse("pipeline=2,schedule=gpipe,v=2").schedule == "gpipe"
    # no pipeline: nothing to schedule, so the keys are dropped rather than refused
    assert Strategy.parse("data=8,v=3,schedule=gpipe") == Strategy.parse("data=8")


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("data=two", "must be an integer"),
        ("dat=2", "unknown strategy key 'dat'"),
        ("remat=sometimes", "remat="),
        ("data=0", "positive"),
        ("data", "not key=value"),
        ("microbatches=-1", "positive"),
        ("pipeline=2,schedule=zb", "schedule='zb'"),
        ("pipeline=2,schedule=interleaved", "stages_per_device=V >= 2"),
        ("pipeline=2,schedule=dualpipe,v=2", "use stages_per_device=1"),
        ("pipeline=2,v=x", "must be an integer"),
    ],
)
def test_malformed_specs_say_what_is_wrong(bad, needle):
    with pytest.raises(StrategyError, match=needle):
        Strategy.parse(bad)


SIZES = {"data": 2, "fsdp": 4, "tensor": 2, "pipeline": 1, "expert": 1, "sequence": 1}


def test_strict_rules_raise_naming_the_param():
    rules = default_rules()
    with pytest.raises(RulesError, match=r"blocks/attn/wq.*not divisible"):
        rules.resolve(("embed", "heads", "head_dim"), (66, 8, 16), SIZES, path="blocks/attn/wq")
    twice = Rules.from_pairs([("embed", "fsdp"), ("mlp", "fsdp")])
    with pytest.raises(RulesError, match=r"ffn/w_up.*already shards"):
        twice.resolve(("embed", "mlp"), (64, 128), SIZES, path="ffn/w_up")
    with pytest.raises(RulesError, match=r"ffn/w_up.*unknown logical axis 'hidden'"):
        rules.resolve(("hidden", "mlp"), (64, 128), SIZES, path="ffn/w_up")
    with pytest.raises(RulesError, match="unknown mesh axis"):
        Rules.from_pairs([("embed", "model")])


def test_non_strict_rules_record_what_was_dropped():
    spec, dropped = default_rules().resolve(("kv_heads", "head_dim"), (1, 16), SIZES, path="wk", strict=False)
    assert spec == jax.sharding.PartitionSpec()
    assert len(dropped) == 1 and dropped[0].path == "wk" and "not divisible" in dropped[0].reason


def test_flax_precedence_first_rule_wins():
    rules = Rules.from_pairs([("embed", "tensor"), ("embed", "fsdp")])
    spec, _ = rules.resolve(("embed",), (64,), SIZES)
    assert spec == jax.sharding.PartitionSpec("tensor")


def test_rules_file(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("- [embed, fsdp]\n- [mlp, [tensor, data]]\n- [heads, null]\n")
    r = Rules.from_file(str(f))
    assert r.lookup("mlp") == ("tensor", "data") and r.lookup("heads") == ()
    s = Strategy.parse(f"fsdp=2,rules={f}")
    assert default_rules(s) == r


def test_enumeration_for_256_devices_is_large_and_valid():
    cfg = get_preset("llama3.1-70b")
    w = Workload(global_batch=512, seq_len=8192)
    e = enumerate_strategies(cfg, w, 256)
    assert len(e.valid) > 300  # counted: many valid layouts, no expert axis for a dense model
    assert all(s.n_devices == 256 and s.sizes["expert"] == 1 for s in e.valid)
    assert e.rejected["expert parallelism needs an MoE model"] > 0
    moe = enumerate_strategies(get_preset("deepseek-v3"), w, 256)
    assert any(s.sizes["expert"] > 1 for s in moe.valid)
    assert all(
        s.sizes["pipeline"] <= 58 for s in moe.valid
    )  # uneven stages allowed, never more than MoE layers
    assert any(s.sizes["pipeline"] == 16 for s in moe.valid)  # DeepSeek-V3 trained on 16 stages of 61 layers


def test_mesh_needs_enough_devices():
    with pytest.raises(StrategyError, match="needs 16 devices"):
        MeshSpec.from_strategy(Strategy.parse("data=16")).build(jax.devices()[:8])


def test_describe_rows_use_scaling_book_notation():
    cfg = get_preset("tiny-dense")
    s = Strategy.parse("fsdp=4,tensor=2")
    prog = TrainProgram(cfg, Workload(8, 32), s, MeshSpec.from_strategy(s).build(jax.devices()))
    rows = {r.path: r for r in describe(prog)}
    up = rows["dense_blocks/ffn/w_up"]
    assert up.notation == "W[L, D_fsdp, F_tensor]"
    assert up.bytes_per_device == 2 * 64 * 128 * 4 // 8
    assert rows["embed"].notation == "W[V_tensor, D_fsdp]"


TINY = {
    name: enumerate_strategies(
        get_preset(name), Workload(8, 32), 8, remats=("none", "full"), microbatches=(1, 2)
    ).valid
    for name in ("tiny-dense", "tiny-moe", "tiny-mla")
}


@pytest.mark.slow  # six compiles; the compile tests of test_compile_targets cover the layouts in CI
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.sampled_from([(n, s) for n, ss in TINY.items() for s in ss]))
def test_every_enumerated_tiny_strategy_compiles(case):
    name, strategy = case
    # The planner's mode: soft rules (kv_heads, vocab) that do not divide are dropped and recorded.
    prog = TrainProgram(
        get_preset(name),
        Workload(8, 32),
        strategy,
        MeshSpec.from_strategy(strategy).build(jax.devices()),
        strict=False,
    )
    if strategy.sizes["tensor"] > get_preset(name).kv_heads:
        assert any(d.logical == "kv_heads" for d in prog.dropped_rules)
    compiled = prog.lower().compile()
    assert compiled.memory_analysis() is not None

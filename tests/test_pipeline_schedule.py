"""The pipeline schedule arithmetic (closed_form/pipeline.py) and what the memory model and the
planner take from it."""

from __future__ import annotations

import dataclasses

import pytest

from codesign.closed_form import analytic_memory
from codesign.closed_form import pipeline as PL
from codesign.closed_form.params import pipeline_transfers, sharded_params
from codesign.config import Workload
from codesign.cost.estimate import estimate_analytic
from codesign.hardware.catalog import load_hardware
from codesign.planner import PlanRequest, plan
from codesign.planner.search import step_lower_bound
from codesign.presets import get_preset
from codesign.sharding.strategy import PIPELINE_SCHEDULES, Strategy

NO_P2P = PL.ChunkTimes(forward=1.0, backward=2.0, weight_grad=1.0, p2p=0.0)


def _ideal_fraction(c: PL.PipelineCost) -> float:
    return c.bubble_s / c.ideal_s


@pytest.mark.parametrize("p,m", [(4, 8), (8, 32), (2, 2)])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m(p, m):
    for sched in ("gpipe", "1f1b"):
        c = PL.pipeline_cost(sched, p, 1, m, NO_P2P)
        assert _ideal_fraction(c) == pytest.approx((p - 1) / m)
        assert c.step_s == pytest.approx((m + p - 1) * 3.0)


def test_interleaved_v2_halves_the_1f1b_bubble():
    p, m = 4, 8
    plain = PL.pipeline_cost("1f1b", p, 1, m, NO_P2P)
    # V=2 chunks of half the layers: each chunk's F and B are half the stage's.
    half = PL.ChunkTimes(0.5, 1.0, 0.5, 0.0)
    inter = PL.pipeline_cost("interleaved", p, 2, m, half)
    assert inter.ideal_s == pytest.approx(plain.ideal_s)
    assert inter.bubble_s == pytest.approx(plain.bubble_s / 2)
    assert _ideal_fraction(inter) == pytest.approx((p - 1) / (2 * m))
    with_p2p = PL.ChunkTimes(0.5, 1.0, 0.5, 0.01)
    assert PL.pipeline_cost("interleaved", p, 2, m, with_p2p).p2p_transfers == 2 * (
        PL.pipeline_cost("1f1b", p, 1, m, with_p2p).p2p_transfers
    )


def test_dualpipe_bubble_from_the_deepseek_table():
    p, m = 8, 16
    c = PL.pipeline_cost("dualpipe", p, 1, m, NO_P2P)
    f, b, w = NO_P2P.forward, NO_P2P.backward, NO_P2P.weight_grad
    assert c.bubble_s == pytest.approx((p / 2 - 1) * ((f + b) + b - 3 * w))
    assert c.bubble_s < PL.pipeline_cost("1f1b", p, 1, m, NO_P2P).bubble_s
    assert c.param_copies == 2 and c.in_flight == p + 1


def test_in_flight_follows_the_executed_program():
    """The closed form counts what `train` holds: gpipe every forward tick's chunk, 1F1B a ring of
    min(2pV - 1, mV) chunk forwards (`arithmetic.ring_slots`; the compiled ring is checked in
    test_pipeline), so 1F1B's stays flat as microbatches grow while gpipe's grows."""
    p, m = 4, 16
    gpipe, f1b, inter = (
        PL.in_flight_microbatches(s, p, v, m) for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))
    )
    assert gpipe == m + p - 1 and f1b == 2 * p - 1
    assert inter == pytest.approx((2 * p * 2 - 1) / 2)
    assert gpipe > inter > f1b
    assert PL.in_flight_microbatches("1f1b", p, 1, 64) == f1b  # flat in m
    assert PL.in_flight_microbatches("gpipe", p, 1, 64) == 64 + p - 1
    assert PL.in_flight_microbatches("1f1b", p, 1, 2) == 2  # fewer microbatches than the ring


def test_schedule_problems_name_the_rule():
    assert "divisible by pipeline=4" in PL.schedule_problem("interleaved", 4, 2, 6, 8)
    assert PL.schedule_problem("interleaved", 4, 2, 8, 8) is None
    assert "does not divide" in PL.schedule_problem("interleaved", 4, 3, 8, 8)
    assert ">= 2 x pipeline" in PL.schedule_problem("dualpipe", 4, 1, 6, 8)
    assert "even pipeline" in PL.schedule_problem("dualpipe", 3, 1, 6, 8)
    assert PL.SCHEDULES == PIPELINE_SCHEDULES


def test_dualpipe_overlap_hook():
    assert PL.overlapped_fraction("1f1b", 8, 64, "all-to-all") == 0.0
    assert PL.overlapped_fraction("dualpipe", 8, 64, "all-reduce") == 0.0
    f = PL.overlapped_fraction("dualpipe", 8, 64, "all-to-all")
    assert f == pytest.approx((64 - 12 + 1) / 64)
    assert PL.overlapped_fraction("dualpipe", 8, 256, "all-to-all") > f


CFG = dataclasses.replace(get_preset("tiny-dense"), layers=8)  # room for 4 stages of 2 chunks
WL = Workload(32, 64)


def test_memory_in_flight_and_dualpipe_state():
    base = "pipeline=2,fsdp=4,remat=full,microbatches=8"
    mem = {
        s: analytic_memory(CFG, WL, Strategy.parse(f"{base},schedule={s}"))
        for s in ("gpipe", "1f1b", "dualpipe")
    }
    mem["interleaved"] = analytic_memory(CFG, WL, Strategy.parse(f"{base},v=2"))
    one = mem["1f1b"].saved_activations  # remat=full: the 4 stage layers' inputs
    buffers = 2 * 8 * one / 4  # gpipe: the embedded input of the 8 microbatches and its gradient
    assert mem["1f1b"].pipeline_in_flight == pytest.approx(one * (3 - 1))  # ring of 2p - 1, lookup in loop
    assert mem["gpipe"].pipeline_in_flight == pytest.approx(one * (8 + 1 - 1) + buffers)  # m + p - 1
    assert mem["gpipe"].total > mem["interleaved"].total > mem["1f1b"].total
    # DualPipe holds two stages' layers (stage i and p - 1 - i); the embedding and head once.
    layers = sum(
        sp.local_elems * sp.count * WL.param_bytes
        for sp in sharded_params(CFG, Strategy.parse(base))
        if sp.group.where != "global"
    )
    assert 0 < layers < mem["1f1b"].params
    assert mem["dualpipe"].params == pytest.approx(mem["1f1b"].params + layers)
    assert mem["dualpipe"].optimizer == pytest.approx(
        mem["1f1b"].optimizer * (1 + layers / mem["1f1b"].params)
    )


def test_estimate_bubble_follows_the_schedule():
    hw = load_hardware("h100", devices=8)
    s = Strategy.parse("pipeline=4,data=2,remat=full,microbatches=4")
    f1b = estimate_analytic(CFG, WL, s, hw)
    inter = estimate_analytic(CFG, WL, s.replace(stages_per_device=2), hw)
    assert inter.pipeline_bubble_s < f1b.pipeline_bubble_s
    assert inter.collective_s["collective-permute"] > f1b.collective_s["collective-permute"]
    assert any("interleaved v=2" in r for r in inter.reasons)


def test_lower_bound_never_exceeds_the_estimate():
    hw = load_hardware("h100", devices=8)
    for spec in (
        "data=8,remat=none",
        "fsdp=8,remat=full,microbatches=4",
        "pipeline=2,fsdp=4,remat=full,microbatches=8,v=2",
        "pipeline=4,tensor=2,remat=dots,microbatches=8,schedule=dualpipe",
        "pipeline=2,data=4,remat=selective,microbatches=4,schedule=gpipe",
    ):
        s = Strategy.parse(spec)
        assert step_lower_bound(CFG, WL, s, hw) <= estimate_analytic(CFG, WL, s, hw).step_time_s, spec


def test_busy_time_does_not_fall_with_microbatches():
    """The planner's second bound (search._Scorer) rests on this property of the closed form."""
    hw = load_hardware("h100", devices=8)
    for base in ("fsdp=8,remat=full", "data=2,tensor=4,remat=none", "pipeline=2,fsdp=4,remat=dots"):
        busy = [
            estimate_analytic(CFG, WL, Strategy.parse(f"{base},microbatches={m}"), hw).busy_s
            for m in (1, 2, 4)
        ]
        assert busy == sorted(busy), base


def test_plan_searches_schedules_v_and_many_microbatches():
    hw = load_hardware("h100", devices=8)
    req = PlanRequest(
        cfg=CFG,
        hardware=hw,
        workload=Workload(64, 64),
        n_devices=8,
        target="analytic",
        remats=("full",),
        use_cache=False,
        axis_orders=False,
    )
    result = plan(req)
    specs = [r["spec"] for r in result.scored]
    strategies = [Strategy.parse(s) for s in specs]
    assert any(s.stages_per_device > 1 for s in strategies)
    assert any(s.microbatches > 8 for s in strategies)
    assert any(s.schedule == "dualpipe" for s in strategies)
    # The invalid combinations are rows of the rejection table, with the rule as the reason.
    assert any(k.startswith("interleaved needs microbatches divisible by pipeline") for k in result.rejected)
    assert any("pipeline" in line and "worth it" in line for line in result.explanation)


def test_plan_rerun_reads_the_plan_cache(tmp_path):
    hw = load_hardware("h100", devices=8)
    kw = {
        "cfg": CFG,
        "hardware": hw,
        "workload": WL,
        "n_devices": 8,
        "target": "analytic",
        "remats": ("full",),
    }
    first = plan(PlanRequest(**kw, cache_dir=str(tmp_path)))
    again = plan(PlanRequest(**kw, cache_dir=str(tmp_path)))
    assert again.search.get("plan_cache") and not first.search.get("plan_cache")
    assert [(r["strategy"]["spec"], r["step_time_s"]) for r in again.candidates] == [
        (r["strategy"]["spec"], r["step_time_s"]) for r in first.candidates
    ]
    assert again.chosen == first.chosen and len(again.scored) == len(first.scored)
    other = plan(PlanRequest(**{**kw, "remats": ("dots",)}, cache_dir=str(tmp_path)))
    assert not other.search.get("plan_cache")  # a different request is searched again


def test_fix_pins_schedule_and_v():
    from codesign.planner.constraints import parse_fix

    hw = load_hardware("h100", devices=8)
    req = PlanRequest(
        cfg=CFG,
        hardware=hw,
        workload=WL,
        n_devices=8,
        target="analytic",
        remats=("full",),
        use_cache=False,
        constraints=parse_fix("pipeline=4,schedule=interleaved,v=2"),
    )
    got = {Strategy.parse(r["spec"]) for r in plan(req).scored}
    assert got and all(s.schedule == "interleaved" and s.stages_per_device == 2 for s in got)
    assert all(s.microbatches % 4 == 0 for s in got)  # Megatron's rule, applied by the search


def test_once_per_step_pipeline_collectives_follow_the_program():
    """Outside the tick loop the program moves an MoE prefix's output to every stage (and its gradient
    back), and gathers the prefix's weights, sharded over the stages (its layers for the forward and
    the backward, the embedding for the lookup), and reduce-scatters their gradients; a dense pipeline moves nothing there, even when its layers do not divide by the stages
    (the stack is stored padded, each stage holding its own layers). The estimate charges them as exposed collectives over pipeline."""
    hw = load_hardware("h100", devices=8)
    even = Strategy.parse("pipeline=2,data=4,remat=full,microbatches=4")
    assert pipeline_transfers(CFG, WL, even) == ()
    assert pipeline_transfers(CFG.replace(layers=7), WL, even) == ()
    moe = get_preset("tiny-moe").replace(layers=5)  # 1 dense + 4 MoE: the prefix runs split over stages
    s = Strategy.parse("pipeline=2,expert=4,remat=full,microbatches=4")
    table = WL.global_batch / s.batch_shards * WL.seq_len * moe.hidden * 2
    prefix = [sp for sp in sharded_params(moe, s) if sp.group.where == "dense"]
    (embed,) = [sp for sp in sharded_params(moe, s) if sp.group.name == "embed"]
    assert prefix and all("pipeline" in sp.axes for sp in [*prefix, embed])  # sharded over the stages
    layers = sum(sp.group.elems for sp in prefix) * WL.param_bytes  # gathered twice
    lookup = embed.group.elems * WL.param_bytes  # gathered once (its gradient needs only the ids)
    assert pipeline_transfers(moe, WL, s) == (
        ("all-gather", table),
        ("all-reduce", table),
        ("all-gather", pytest.approx(layers)),
        ("all-gather", pytest.approx(layers)),
        ("all-gather", pytest.approx(lookup)),
        ("reduce-scatter", pytest.approx(layers + lookup)),
    )
    est = estimate_analytic(moe, WL, s, hw)
    assert any("outside the loop" in r for r in est.reasons)

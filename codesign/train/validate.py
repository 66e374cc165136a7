"""`run_validation`: measure a plan's top candidates on the attached devices, next to their estimates.

For each of the first K candidates that fit and can run here (their mesh uses exactly the attached
device count): build the TrainProgram, initialize the state into its shardings,
compile the step ahead of time, run W warm-up steps, then time M steps one by one (each waited for)
and take the median. Rows report estimated and measured step time and `ratio = measured /
estimated`; `rank_correlation` is Spearman's rho between the estimated and the measured order (the
question a planner must get right is the order, not the absolute numbers), null with fewer than three
rows. A plan for another device count, or one with nothing runnable here, is an error, not an empty
table. On a CPU the result carries a caveat: emulated devices share the host's cores, so the measured
times are not the target's.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from codesign.config import ModelConfig
from codesign.sharding.mesh import check_slices
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.state_layout import OptimizerConfig
from codesign.train.data import BatchMaker, SyntheticSource
from codesign.train_step import TrainProgram

MIN_RANK_ROWS = 3
CPU_CAVEAT = (
    "measured on CPU: emulated devices share the host's cores, so these step times say nothing about "
    "the target hardware's; the ratios are not errors of the estimate"
)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (scipy; ties share their average rank). None with fewer than
    MIN_RANK_ROWS points or when either side has no spread: with two points rho is always +-1 and says
    nothing about the planner."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} vs {len(ys)} values")
    if len(xs) < MIN_RANK_ROWS or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def measure(prog: TrainProgram, steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Compile, warm up and time one program: {"compile_s", "step_times_s", "median_s", "loss"}."""
    w = prog.workload
    batches = BatchMaker(
        lambda pi, pc: SyntheticSource(
            prog.cfg.vocab_size, w.seq_len, w.global_batch, seed, process_index=pi, process_count=pc
        ),
        w.global_batch,
        w.seq_len,
        prog.batch_sharding,
    )
    state = prog.init(seed)
    t0 = time.perf_counter()
    step = prog.lower().compile()
    compile_s = time.perf_counter() - t0
    batch = batches(0)
    jax.block_until_ready(batch)
    times: list[float] = []
    out = None
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    loss = float(jax.device_get(out["loss"].addressable_shards[0].data)) if out is not None else None
    del state
    return {
        "compile_s": compile_s,
        "step_times_s": times,
        "median_s": statistics.median(times) if times else None,
        "loss": loss,
    }


def _check_devices(data: dict[str, Any], where: str, attached: int) -> None:
    """A plan made for another device count has nothing to measure here: one error, not a skip per row."""
    needs = sorted({Strategy.parse(c["strategy"]["spec"]).n_devices for c in data["candidates"]})
    if needs and attached not in needs:
        from codesign.train.trainer import TrainError

        n = needs[0] if len(needs) == 1 else needs
        raise TrainError(
            f"{where} is a plan for {n} devices, but {attached} are attached; run validate with "
            f"--devices {needs[0]} (CPU emulation), or make a plan for {attached} devices"
        )


def _skip_summary(skipped: list[dict[str, str]]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return "; ".join(f"{n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def run_validation(
    model: str | ModelConfig,
    plan: str | dict,
    *,
    top: int = 3,
    steps: int = 5,
    warmup: int = 2,
    attention: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    slices: int | None = None,
) -> dict[str, Any]:
    """Measure the plan's top `top` runnable candidates; see the module docstring.

    Returns {"rows": [{"spec","estimated_step_time_s","measured_step_time_s","ratio", ...}],
    "rank_correlation" (None with fewer than 3 rows), "skipped": [{"spec","reason"}], "devices",
    "caveat", ...}. Raises TrainError when the plan is for another device count or nothing could be
    measured.
    """
    from codesign.config import Workload
    from codesign.model_io import load_model_config
    from codesign.plan_file import load_plan
    from codesign.train.loop import finite_row
    from codesign.train.trainer import TrainError, attention_impl, build_mesh, get_program, workload_fields

    say = log or (lambda m: print(m, file=sys.stderr))
    if steps < 1 or warmup < 0 or top < 1:
        raise TrainError(f"need --steps >= 1, --warmup >= 0 and --top >= 1 (got {steps}, {warmup}, {top})")
    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    data = load_plan(plan) if not isinstance(plan, dict) else plan
    where = f"plan {plan}" if not isinstance(plan, dict) else "the plan"
    workload = Workload(**{**workload_fields(data.get("workload", {})), "mode": "train"})
    attached = jax.device_count()
    _check_devices(data, where, attached)
    caveat = CPU_CAVEAT if jax.default_backend() == "cpu" else None
    if caveat:
        say(f"note: {caveat}")
    impl = attention_impl(attention or workload.attention)  # default: the kernel the plan was costed for
    if impl != workload.attention:
        say(
            f"note: the plan was costed for {workload.attention} attention; measuring {impl} "
            f"(plan with --attention {impl} to compare like with like)"
        )
    workload = dataclasses.replace(workload, attention=impl)
    if slices is None:  # the slices the plan was made for (a candidate that cannot lay over them is skipped)
        slices = (data.get("hardware") or {}).get("slices")
    rows, skipped = [], []
    for cand in data["candidates"]:
        if len(rows) >= top:
            break
        spec = cand["strategy"]["spec"]
        strategy = Strategy.parse(spec)
        reason = None
        if not cand.get("fits", True):
            reason = "does not fit in memory (per the plan)"
        elif strategy.n_devices != attached:
            reason = f"needs {strategy.n_devices} devices, {attached} attached"
        elif cand.get("step_time_s") is None:
            reason = "the plan has no estimated step time for it"
        if reason is None:
            try:
                check_slices(strategy.mesh, jax.devices(), slices)
                prog = get_program(cfg, workload, strategy, build_mesh(strategy), OptimizerConfig())
                say(f"measuring {spec} ({warmup} warm-up + {steps} timed steps)")
                m = measure(prog, steps, warmup, seed)
            except StrategyError as e:
                reason = str(e)
        if reason is not None:
            skipped.append({"spec": spec, "reason": reason})
            continue
        est = float(cand["step_time_s"])
        rows.append(
            finite_row(
                {
                    "spec": spec,
                    "estimated_step_time_s": est,
                    "measured_step_time_s": m["median_s"],
                    "ratio": m["median_s"] / est if est > 0 else None,
                    "rank": cand.get("rank"),
                    "evidence": cand.get("evidence"),
                    "compile_s": m["compile_s"],
                    "step_times_s": m["step_times_s"],
                    "loss": m["loss"],
                }
            )
        )
    if skipped:
        say(f"skipped {len(skipped)} candidates: {_skip_summary(skipped)}")
    if not rows:
        raise TrainError(
            f"nothing was measured: none of the {len(data['candidates'])} candidates in {where} can "
            f"run here ({_skip_summary(skipped) or 'the plan has no candidates'})"
        )
    rho = spearman([r["estimated_step_time_s"] for r in rows], [r["measured_step_time_s"] for r in rows])
    return {
        "rows": rows,
        "rank_correlation": rho,
        "skipped": skipped,
        "devices": attached,
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "model": cfg.name,
        "workload": workload.to_json(),
        "steps": steps,
        "warmup": warmup,
        "ratio_definition": "measured / estimated",
        "caveat": caveat,
        "rank_correlation_note": None
        if rho is not None
        else f"needs at least {MIN_RANK_ROWS} measured rows with distinct times",
    }

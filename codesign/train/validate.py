"""`run_validation`: measure a plan's top candidates on the attached devices, next to their estimates.

For each of the first K candidates that fit and can run here (their mesh uses exactly the attached
device count, no pipeline axis): build the TrainProgram, initialize the state into its shardings,
compile the step ahead of time, run W warm-up steps, then time M steps one by one (each waited for)
and take the median. Rows report estimated and measured step time and `ratio = measured /
estimated`; `rank_correlation` is Spearman's rho between the estimated and the measured order (the
question a planner must get right is the order, not the absolute numbers).
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
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.train.data import SyntheticSource
from codesign.train_step import OptimizerConfig, TrainProgram


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None with < 2 points or no spread."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} vs {len(ys)} values")
    if len(xs) < 2:
        return None
    rx, ry = _ranks(list(xs)), _ranks(list(ys))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / (vx * vy) ** 0.5


def measure(prog: TrainProgram, steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Compile, warm up and time one program: {"compile_s", "step_times_s", "median_s", "loss"}."""
    from codesign.train.trainer import BatchMaker

    w = prog.workload
    batches = BatchMaker(lambda pi, pc: SyntheticSource(prog.cfg.vocab_size, w.seq_len, w.global_batch, seed,
                                                        process_index=pi, process_count=pc),
                         w, prog.batch_sharding)
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
    return {"compile_s": compile_s, "step_times_s": times, "median_s": statistics.median(times) if times else None,
            "loss": loss}


def run_validation(model: str | ModelConfig, plan: str | dict, *, top: int = 3, steps: int = 5,
                   warmup: int = 2, attention: str | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the plan's top `top` runnable candidates; see the module docstring.

    Returns {"rows": [{"spec","estimated_step_time_s","measured_step_time_s","ratio", ...}],
    "rank_correlation", "skipped": [{"spec","reason"}], "devices", ...}.
    """
    from codesign.config import Workload
    from codesign.model_io import load_model_config
    from codesign.plan_file import load_plan
    from codesign.train.trainer import TrainError, attention_impl, build_mesh, get_program, workload_fields

    say = log or (lambda m: print(m, file=sys.stderr))
    if steps < 1 or warmup < 0 or top < 1:
        raise TrainError(f"need --steps >= 1, --warmup >= 0 and --top >= 1 (got {steps}, {warmup}, {top})")
    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    data = load_plan(plan) if not isinstance(plan, dict) else plan
    workload = Workload(**{**workload_fields(data.get("workload", {})), "mode": "train"})
    attached = jax.device_count()
    impl = attention_impl(attention or workload.attention)  # default: the kernel the plan was costed for
    if impl != workload.attention_impl:
        say(f"note: the plan was costed for {workload.attention} attention; measuring {impl or 'xla'} "
            f"(plan with --attention {impl or 'xla'} to compare like with like)")
    workload = dataclasses.replace(workload, attention=impl or "xla")
    rows, skipped = [], []
    for cand in data["candidates"]:
        if len(rows) >= top:
            break
        spec = cand["strategy"]["spec"]
        strategy = Strategy.parse(spec)
        reason = None
        if not cand.get("fits", True):
            reason = "does not fit in memory (per the plan)"
        elif strategy.size("pipeline") > 1:
            reason = "pipeline schedules are not executed (the planner costs them analytically)"
        elif strategy.n_devices != attached:
            reason = f"needs {strategy.n_devices} devices, {attached} attached"
        elif cand.get("step_time_s") is None:
            reason = "the plan has no estimated step time for it"
        if reason:
            skipped.append({"spec": spec, "reason": reason})
            say(f"skip {spec}: {reason}")
            continue
        try:
            prog = get_program(cfg, workload, strategy, build_mesh(strategy), OptimizerConfig())
            say(f"measuring {spec} ({warmup} warm-up + {steps} timed steps)")
            m = measure(prog, steps, warmup, seed)
        except StrategyError as e:
            skipped.append({"spec": spec, "reason": str(e)})
            say(f"skip {spec}: {e}")
            continue
        est = float(cand["step_time_s"])
        rows.append({"spec": spec, "estimated_step_time_s": est, "measured_step_time_s": m["median_s"],
                     "ratio": m["median_s"] / est if est > 0 else None, "rank": cand.get("rank"),
                     "evidence": cand.get("evidence"), "compile_s": m["compile_s"],
                     "step_times_s": m["step_times_s"], "loss": m["loss"]})
    rho = spearman([r["estimated_step_time_s"] for r in rows], [r["measured_step_time_s"] for r in rows])
    return {"rows": rows, "rank_correlation": rho, "skipped": skipped, "devices": attached,
            "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "model": cfg.name, "workload": workload.to_json(), "steps": steps, "warmup": warmup,
            "ratio_definition": "measured / estimated"}

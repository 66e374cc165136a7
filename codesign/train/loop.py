"""The step loop of a training run: timing, strict-JSON rows and metrics lines, the progress bar, the
non-finite policy and the checkpoint saves. `run_training` (trainer.py) resolves everything else.

Step i's time runs from step i-1's completion to step i's (the next batch is prepared on the host while
the device computes). The first step of a run includes compilation and is left out of tokens/s and MFU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codesign.train.checkpoint import Checkpointer, NonFiniteState
from codesign.train.errors import NonFiniteLoss

NAN_POLICIES = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 10  # a run that only produces NaN is broken, not unlucky


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    steps: int  # train up to this step
    nan_policy: str  # "stop" | "skip"
    tokens_per_step: int
    flops_per_step: float  # model FLOPs of one step, the MFU numerator
    devices: int
    peak_flops_per_device: float | None  # None: MFU unknown
    metrics: str | None = None  # JSON-lines file, appended
    progress: bool = False
    lead: bool = True  # process 0 writes metrics, the bar and the log lines


@dataclasses.dataclass
class LoopResult:
    state: Any
    rows: list[dict[str, Any]]
    saved: list[int]  # steps whose save started
    skipped: list[int]  # steps whose update was dropped (policy skip)


def finite_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with NaN/Infinity floats replaced by None and their keys listed under "nonfinite" (strict
    JSON parsers reject NaN, and a metrics consumer must be told rather than see a silent gap)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}


def scalar(x: jax.Array) -> float:
    """A replicated scalar's value, also when the array spans several processes."""
    return float(np.asarray(x.addressable_shards[0].data))


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), jnp.bool_)


def guarded_step(prog) -> Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]]:
    """`--nan-policy skip`: prog's step, but the params and optimizer state stay as they were when the
    loss or any updated leaf is non-finite; the step counter advances either way (it is the data
    position). out["applied"] says which happened. The old and the new state are both live until the
    choice is made: one extra copy of the state in device memory."""
    replicated = jax.sharding.NamedSharding(prog.mesh, jax.sharding.PartitionSpec())

    def step(state, batch):
        new, out = prog.step_fn(state, batch)
        ok = jnp.isfinite(out["loss"]) & _all_finite(new)
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return {**kept, "step": new["step"]}, {**out, "applied": ok}

    return jax.jit(
        step,
        in_shardings=(prog.state_shardings, prog.batch_sharding),
        out_shardings=(prog.state_shardings, replicated),
        donate_argnums=(0,),
    )


def stop_message(step: int, what: str, ck: Checkpointer | None) -> str:
    if ck is None:
        kept = "no --checkpoint-dir was given, so nothing was saved"
    else:
        ck.wait()
        steps = ck.all_steps()
        kept = (
            f"the checkpoints in {ck.directory} (steps {steps}) are intact; --resume continues from "
            f"step {steps[-1]}"
            if steps
            else f"nothing was saved in {ck.directory}"
        )
    return (
        f"step {step}: {what}; stopped without saving it ({kept}). Lower --lr, check --data, or pass "
        f"--nan-policy skip to skip such batches"
    )


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
    )
    task = bar.add_task("train", total=total, completed=start, info="compiling...")
    return bar, task


@dataclasses.dataclass
class _Recorder:
    """Per-step bookkeeping: rows, metrics lines, progress, the non-finite policy and saves."""

    spec: LoopSpec
    ck: Checkpointer | None
    say: Callable[[str], None]
    out: LoopResult
    in_a_row: int = 0
    mfile: Any = None
    bar: Any = None

    def record(self, step: int, loss: float, dt: float, first: bool, applied: bool) -> None:
        spec, peak = self.spec, self.spec.peak_flops_per_device
        tps = None if first else spec.tokens_per_step / dt
        mfu = None if first or not peak else spec.flops_per_step / (dt * spec.devices * peak)
        row = {
            "step": step,
            "loss": loss,
            "tokens_per_s": tps,
            "mfu": mfu,
            "step_time_s": dt,
            "compile": first,
        }
        if spec.nan_policy == "skip":
            row["skipped"] = not applied
        row = finite_row(row)
        self.out.rows.append(row)
        if self.mfile:
            self.mfile.write(json.dumps({**row, "time": time.time()}, allow_nan=False) + "\n")
            self.mfile.flush()
        if self.bar:
            info = (
                f"loss {loss:.4f}"
                + (f"  {tps:,.0f} tok/s" if tps else "")
                + (f"  MFU {mfu:.1%}" if mfu is not None else "")
                + (f"  skipped {len(self.out.skipped)}" if self.out.skipped else "")
            )
            self.bar[0].update(self.bar[1], completed=step, info=info)

    def check(self, step: int, loss: float, applied: bool) -> None:
        """Stop (policy stop) or count (policy skip) a non-finite step."""
        if self.spec.nan_policy == "stop":
            if not math.isfinite(loss):
                raise NonFiniteLoss(stop_message(step, f"loss is {loss}", self.ck))
            return
        if applied:
            self.in_a_row = 0
            return
        self.out.skipped.append(step)
        self.in_a_row += 1
        if self.spec.lead:
            self.say(
                f"warning: step {step}: loss {loss}, non-finite update skipped "
                f"({len(self.out.skipped)} so far)"
            )
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLoss(
                stop_message(step, f"{self.in_a_row} steps in a row were non-finite", self.ck)
            )

    def save(self, step: int, state: Any, extra: dict[str, Any], last: bool) -> None:
        if self.ck is None:
            return
        try:
            if self.ck.save(step, state, extra, force=last):
                self.out.saved.append(step)
        except NonFiniteState as e:
            what = "NaN or Infinity in " + (
                ", ".join(e.paths[:3]) + (f" and {len(e.paths) - 3} more leaves" if len(e.paths) > 3 else "")
            )
            raise NonFiniteLoss(stop_message(step, what, self.ck)) from None


def run_loop(
    spec: LoopSpec,
    step_fn: Callable,
    batches: Callable[[int], jax.Array],
    state: Any,
    start: int,
    ck: Checkpointer | None,
    extra_at: Callable[[int, float | None], dict[str, Any]],
    say: Callable[[str], None],
) -> LoopResult:
    """Steps start+1 .. spec.steps. `extra_at(step, loss)` is the checkpoint metadata after `step`.
    Raises NonFiniteLoss when the policy stops the run (the metrics line of that step is written)."""
    rec = _Recorder(spec, ck, say, LoopResult(state, [], [], []))
    rec.mfile = open(spec.metrics, "a") if (spec.metrics and spec.lead) else None  # noqa: SIM115 - closed below
    rec.bar = _progress(spec.steps, min(start, spec.steps), spec.progress and spec.lead)
    try:
        if rec.bar:
            rec.bar[0].start()
        batch = batches(start) if start < spec.steps else None
        t_prev = time.perf_counter()
        for i in range(start, spec.steps):
            state, out = step_fn(state, batch)
            batch = batches(i + 1) if i + 1 < spec.steps else None  # host work overlaps the device step
            loss = scalar(out["loss"])  # waits for the step
            applied = bool(scalar(out["applied"])) if "applied" in out else math.isfinite(loss)
            rec.record(i + 1, loss, time.perf_counter() - t_prev, i == start, applied)
            rec.check(i + 1, loss, applied)
            # A skipped step saves the state it kept; its non-finite loss is not metadata.
            rec.save(i + 1, state, extra_at(i + 1, loss if applied else None), last=i + 1 == spec.steps)
            t_prev = time.perf_counter()  # a checkpoint's device-to-host copy is not step time
        if ck is not None:
            ck.wait()
    finally:
        if rec.bar:
            rec.bar[0].stop()
        if rec.mfile:
            rec.mfile.close()
    rec.out.state = state
    return rec.out


def summarize(spec: LoopSpec, result: LoopResult) -> dict[str, Any]:
    timed = [r for r in result.rows if not r["compile"]]
    mean_dt = sum(r["step_time_s"] for r in timed) / len(timed) if timed else None
    peak = spec.peak_flops_per_device
    rows = result.rows
    return {
        "timed_steps": len(timed),
        "mean_step_time_s": mean_dt,
        "tokens_per_s": spec.tokens_per_step / mean_dt if mean_dt else None,
        "mfu": spec.flops_per_step / (mean_dt * spec.devices * peak) if mean_dt and peak else None,
        "compile_step_time_s": rows[0]["step_time_s"] if rows and rows[0]["compile"] else None,
        "skipped_steps": result.skipped,
    }

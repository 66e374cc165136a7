"""`run_training`: execute one layout (a plan's chosen candidate or a `--strategy` spec) for real.

One run: resolve (model, workload, strategy) -> check the devices -> build the `TrainProgram` (params
initialized straight into the plan's shardings, or restored from a checkpoint onto *this* run's
shardings, whatever mesh the checkpoint was saved under) -> loop: data source -> global batch array ->
jitted step. Resume is bit-exact: the state pytree (params, optimizer state, step) comes back exactly,
the data loader position is saved with it, and a batch is a pure function of (seed, step).

`--steps K` is the step to train *up to*: a fresh run does K steps; `--resume` continues from the
latest checkpoint up to step K. The learning-rate horizon is `schedule_steps` (default: K), so
"10 steps" equals "5 steps with schedule_steps=10, then resume to 10".

Throughput: step i's time runs from step i-1's completion to step i's (the next batch is prepared on
the host while the device computes). The first step of a run includes compilation and is left out of
tokens/s and MFU. MFU = train_flops_per_token(cfg, seq_len) x tokens / (step time x devices x peak),
the peak coming from the attached chip's catalog entry (CPU: the catalog's nominal figure, labeled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from codesign.arithmetic import train_flops_per_token
from codesign.config import ConfigError, ModelConfig, Workload
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.train.checkpoint import FINGERPRINT_KEY, Checkpointer, CheckpointError
from codesign.train.data import SyntheticSource, TokenFileSource
from codesign.train_step import OptimizerConfig, TrainProgram

ATTENTION_CHOICES = ("xla", "cudnn", "auto")
PARAM_DTYPES = ("float32", "bfloat16")


class TrainError(ValueError):
    """A training run that cannot start or continue as asked (bad resume, checkpoint dir in use...)."""


# -- resolving the layout --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    cfg: ModelConfig
    workload: Workload
    strategy: Strategy
    source: str  # "plan FILE" or "--strategy"


def workload_fields(d: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(Workload)}
    return {k: v for k, v in (d or {}).items() if k in known}


def resolve_layout(model: str | ModelConfig, *, plan: str | dict | None = None, strategy: str | None = None,
                   global_batch: int | None = None, seq_len: int | None = None,
                   param_dtype: str | None = None, n_devices: int | None = None) -> Layout:
    """The model config, workload and strategy a run uses (plan file or spec; flags override)."""
    from codesign.model_io import load_model_config

    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    if (plan is None) == (strategy is None):
        raise TrainError("give exactly one of --plan FILE or --strategy SPEC")
    if plan is not None:
        from codesign.plan_file import chosen_candidate, load_plan

        data = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
        spec = chosen_candidate(data)["strategy"]["spec"]
        base = workload_fields(data.get("workload", {}))
        planned_model = (data.get("model") or {}).get("name")
        if planned_model and planned_model != cfg.name:
            print(f"note: the plan was made for model {planned_model!r}; training {cfg.name!r}", file=sys.stderr)
        where = f"plan {plan if isinstance(plan, (str, os.PathLike)) else '(dict)'}"
    else:
        spec, base, where = strategy, {}, "--strategy"
    strat = Strategy.parse(spec)
    base = {**base, "mode": "train"}
    if global_batch:
        base["global_batch"] = int(global_batch)
    if seq_len:
        base["seq_len"] = int(seq_len)
    if "global_batch" not in base or "seq_len" not in base:
        from codesign.config import default_workload

        dflt = default_workload(cfg, n_devices or strat.n_devices)
        base.setdefault("global_batch", dflt.global_batch)
        base.setdefault("seq_len", dflt.seq_len)
    if param_dtype:
        if param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"--param-dtype {param_dtype!r}; use one of {PARAM_DTYPES}")
        base["param_dtype"] = param_dtype
    return Layout(cfg, Workload(**base), strat, where)


def check_executable(strategy: Strategy, attached: int) -> None:
    """Refuse layouts this trainer cannot execute on the attached devices."""
    if strategy.size("pipeline") > 1:
        raise StrategyError(
            f"{strategy.spec}: pipeline={strategy.size('pipeline')} cannot be executed; the planner costs "
            f"pipelining analytically and by compiling one stage, but running pipeline schedules is not "
            f"implemented. Train with a pipeline=1 candidate (e.g. --strategy with the same sizes and the "
            f"pipeline factor moved to fsdp or data)")
    if strategy.n_devices != attached:
        raise StrategyError(f"plan needs {strategy.n_devices} devices, {attached} attached "
                            f"(strategy {strategy.spec})")


def attention_impl(choice: str) -> str | None:
    """`--attention`: xla -> XLA's default path; cudnn -> cuDNN flash attention; auto -> cudnn on GPU."""
    if choice not in ATTENTION_CHOICES:
        raise ConfigError(f"--attention {choice!r}; use one of {ATTENTION_CHOICES}")
    backend = jax.default_backend()
    if choice == "auto":
        return "cudnn" if backend == "gpu" else None
    if choice == "cudnn" and backend != "gpu":
        raise ConfigError(f"cuDNN attention needs an NVIDIA GPU, and this run is on {backend}; the plan may "
                          f"have been costed for one. Pass --attention xla (or auto) to run here")
    return None if choice == "xla" else choice


# -- programs (cached per process: a resumed or repeated run in one process reuses the compile) ---
_PROGRAMS: OrderedDict = OrderedDict()
_PROGRAM_CACHE_SIZE = 4


def get_program(cfg: ModelConfig, workload: Workload, strategy: Strategy, mesh,
                optimizer: OptimizerConfig) -> TrainProgram:
    key = (cfg, workload, strategy, mesh, optimizer)
    prog = _PROGRAMS.pop(key, None)
    if prog is None:
        prog = TrainProgram(cfg, workload, strategy, mesh, strict=False, optimizer=optimizer)
    _PROGRAMS[key] = prog
    while len(_PROGRAMS) > _PROGRAM_CACHE_SIZE:
        _PROGRAMS.popitem(last=False)
    return prog


def build_mesh(strategy: Strategy):
    return MeshSpec.from_strategy(strategy).build(jax.devices())


# -- peak FLOP/s for MFU -----------------------------------------------------------------------------
_KIND_TO_CATALOG = (  # substring of jax's device_kind (lower case) -> catalog chip; most specific first
    ("gb200", "gb200-gpu"), ("b200", "b200-sxm"), ("h200", "h200-sxm"), ("h800", "h800-sxm"),
    ("h100", "h100-sxm"), ("a100", "a100-sxm-80g"),
    ("tpu v6 lite", "tpu-v6e-chip"), ("tpu v6e", "tpu-v6e-chip"), ("tpu v5 lite", "tpu-v5e-chip"),
    ("tpu v5e", "tpu-v5e-chip"), ("tpu v5p", "tpu-v5p-chip"), ("tpu v5", "tpu-v5p-chip"),
    ("tpu v4", "tpu-v4-chip"), ("cpu", "cpu"),
)
_DTYPE_KEY = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "float32": "fp32", "fp32": "fp32"}


def catalog_name_for(device_kind: str) -> str | None:
    k = device_kind.lower()
    for needle, name in _KIND_TO_CATALOG:
        if needle in k:
            return name
    return None


def peak_flops(compute_dtype: str, hardware: str | None = None) -> dict[str, Any]:
    """{"peak_flops_per_device", "hardware", "dtype", "nominal", "note"} for the attached chip (or
    `hardware`). peak is None when the chip is not in the catalog (MFU is then null)."""
    from codesign.hardware import load_hardware

    kind = jax.devices()[0].device_kind
    name = hardware or catalog_name_for(kind)
    dkey = _DTYPE_KEY.get(compute_dtype, compute_dtype)
    if name is None:
        return {"peak_flops_per_device": None, "hardware": None, "dtype": dkey, "nominal": False,
                "device_kind": kind, "note": f"device kind {kind!r} is not in the hardware catalog; "
                                             f"pass --hardware NAME to get MFU"}
    hw = load_hardware(name)
    peak = hw.peak_flops.get(dkey) or hw.peak_flops.get("bf16")
    nominal = hw.platform == "cpu"
    note = ("CPU: MFU against the catalog's nominal 1 TFLOP/s per device; not a hardware figure" if nominal
            else f"{name} dense {dkey} peak from the hardware catalog")
    return {"peak_flops_per_device": peak, "hardware": name, "dtype": dkey, "nominal": nominal,
            "device_kind": kind, "note": note}


# -- data ----------------------------------------------------------------------------------------------
def make_source_factory(data: str, cfg: ModelConfig, workload: Workload, seed: int,
                        data_dtype: str = "uint16") -> Callable[[int, int], Any]:
    """(process_index, process_count) -> source. Builds one eagerly so a bad path fails now."""
    if data == "synthetic":
        def factory(pi: int, pc: int):
            return SyntheticSource(cfg.vocab_size, workload.seq_len, workload.global_batch, seed,
                                   process_index=pi, process_count=pc)
    else:
        def factory(pi: int, pc: int):
            return TokenFileSource(data, workload.seq_len, workload.global_batch, seed, dtype=data_dtype,
                                   process_index=pi, process_count=pc, vocab_size=cfg.vocab_size)
    factory(0, 1)
    return factory


class BatchMaker:
    """Global batch arrays for a step. Each process loads only the rows its devices hold: its own
    1/P of the batch when the batch is split evenly over processes in order (data parallel across
    hosts); otherwise the row range its devices need (e.g. all rows when the batch is replicated)."""

    def __init__(self, factory: Callable[[int, int], Any], workload: Workload, sharding):
        self.sharding = sharding
        b, n = workload.global_batch, workload.seq_len + 1
        self.gshape = (b, n)
        pi, pc = jax.process_index(), jax.process_count()
        ranges = sorted({idx[0].indices(b)[:2] for idx in sharding.addressable_devices_indices_map(self.gshape).values()})
        self.rows = (ranges[0][0], max(r[1] for r in ranges))
        even = b % pc == 0 and self.rows == (pi * (b // pc), (pi + 1) * (b // pc))
        self.split = pc == 1 or even
        self.source = factory(pi, pc) if self.split else factory(0, 1)

    def __call__(self, step: int) -> jax.Array:
        if self.split:
            return self.source.global_batch_array(step, None, self.sharding)
        lo, hi = self.rows
        rows = self.source.batch(step)[lo:hi]
        return jax.make_array_from_process_local_data(self.sharding, rows, self.gshape)

    def state_at(self, next_step: int) -> dict[str, Any]:
        """The loader state as it is when `next_step` is the next batch to read."""
        saved = self.source.next_step
        self.source.next_step = int(next_step)
        try:
            return self.source.state()
        finally:
            self.source.next_step = saved

    def restore(self, state: dict[str, Any]) -> None:
        try:
            self.source.restore(state)
        except ValueError as e:
            raise TrainError(str(e)) from None


# -- checkpoints -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs two absl WARNINGs whenever a directory is opened read-only; they are expected here."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _reader(directory: str) -> Checkpointer:
    with _quiet_absl():
        return Checkpointer(directory, read_only=True)


def _existing_steps(directory: str) -> tuple[list[int], dict[str, Any] | None]:
    """Finished steps in a checkpoint directory and the latest one's metadata (reads only)."""
    if not os.path.isdir(directory):
        return [], None
    with _reader(directory) as ro:
        steps = ro.all_steps()
        return steps, (ro.read_extra(steps[-1]) if steps else None)


def preflight_checkpoint(directory: str, fingerprint: str, resume: bool) -> int | None:
    """Check a checkpoint directory against this run before anything is written; the latest step to
    resume from (None: start fresh)."""
    steps, extra = _existing_steps(directory)
    if not steps:
        return None
    saved_fp = (extra or {}).get(FINGERPRINT_KEY)
    if saved_fp != fingerprint:
        saved_name = (extra or {}).get("model", "another model")
        raise CheckpointError(
            f"checkpoint directory {directory} (step {steps[-1]}) was written for {saved_name!r}, whose "
            f"architecture differs from this run's model; use another --checkpoint-dir (nothing was changed)")
    if not resume:
        raise TrainError(f"checkpoint directory {directory} already holds steps {steps}; pass --resume to "
                         f"continue from step {steps[-1]}, or use another --checkpoint-dir")
    return steps[-1]


def restore_state(prog: TrainProgram, directory: str, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
    """Read a checkpoint onto `prog`'s shardings (whatever mesh it was saved under):
    (step, state, extra)."""
    with _reader(directory) as ck:
        r = ck.restore(step, prog.abstract_state, model_fingerprint=prog.cfg.fingerprint())
    return r.step, r.state, r.extra


# -- the run -----------------------------------------------------------------------------------------
def _scalar(x: jax.Array) -> float:
    """A replicated scalar's value, also when the array spans several processes."""
    return float(np.asarray(x.addressable_shards[0].data))


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=Console(stderr=True))
    task = bar.add_task("train", total=total, completed=start, info="compiling...")
    return bar, task


def run_training(model: str | ModelConfig, *, steps: int, plan: str | dict | None = None,
                 strategy: str | None = None, devices: int | None = None,
                 checkpoint_dir: str | None = None, resume: bool = False, save_every: int | None = None,
                 keep: int = 3, global_batch: int | None = None, seq_len: int | None = None,
                 lr: float = 3e-4, warmup_steps: int = 10, schedule_steps: int | None = None,
                 data: str = "synthetic", data_dtype: str = "uint16", seed: int = 0,
                 metrics: str | None = None, attention: str | None = None, param_dtype: str | None = None,
                 hardware: str | None = None, progress: bool = False, return_state: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train `model` with one layout on the attached devices; see the module docstring.

    Returns {"steps": [{"step","loss","tokens_per_s","mfu","step_time_s","compile"}], "checkpoint":
    [{"step","path"}], "devices", "strategy", "workload", "resumed_from", "final_step", "summary",
    "mfu_basis", "dropped_rules", ...}; with `return_state`, also "state" (the final state pytree).
    """
    say = log or (lambda m: print(m, file=sys.stderr))
    lead = jax.process_index() == 0
    if steps < 0:
        raise TrainError(f"--steps must be >= 0, got {steps}")
    attached = jax.device_count()
    layout = resolve_layout(model, plan=plan, strategy=strategy, global_batch=global_batch, seq_len=seq_len,
                            param_dtype=param_dtype, n_devices=attached)
    cfg, workload, strat = layout.cfg, layout.workload, layout.strategy
    check_executable(strat, attached)
    if devices is not None and devices != attached:
        raise StrategyError(f"--devices {devices} given, but {attached} devices are attached"
                            + (" (on a real accelerator --devices must equal the attached count)"
                               if jax.default_backend() != "cpu" else ""))
    impl = attention_impl(attention or workload.attention)  # default: the plan's (xla for --strategy)
    workload = dataclasses.replace(workload, attention=impl or "xla")
    peak = peak_flops(workload.dtype, hardware)  # a bad --hardware fails before anything compiles
    factory = make_source_factory(data, cfg, workload, seed, data_dtype)  # a missing file fails here
    fingerprint = cfg.fingerprint()
    if resume and not checkpoint_dir:
        raise TrainError("--resume needs --checkpoint-dir")
    ckdir = os.path.abspath(checkpoint_dir) if checkpoint_dir else None
    resume_step = preflight_checkpoint(ckdir, fingerprint, resume) if ckdir else None

    opt = OptimizerConfig(learning_rate=lr, warmup_steps=warmup_steps, total_steps=schedule_steps or steps or 1)
    mesh = build_mesh(strat)
    prog = get_program(cfg, workload, strat, mesh, opt)
    dropped = [str(d) for d in prog.dropped_rules]
    if lead:
        say(f"training {cfg.name} with {strat.spec} on {attached} {jax.devices()[0].device_kind} devices "
            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); global batch "
            f"{workload.global_batch} x {workload.seq_len} tokens; from {layout.source}")
        for d in dropped:
            say(f"  rule dropped: {d}")
    batches = BatchMaker(factory, workload, prog.batch_sharding)

    # State: restored onto this run's shardings, or initialized into them.
    if resume_step is not None:
        start, state, extra = restore_state(prog, ckdir)
        batches.restore(extra.get("data", {}))
        if int(_scalar(state["step"])) != start:
            raise CheckpointError(f"checkpoint step {start} holds state step {int(_scalar(state['step']))}")
        if extra.get("optimizer") and extra["optimizer"] != dataclasses.asdict(opt) and lead:
            say(f"note: optimizer settings differ from the checkpoint's ({extra['optimizer']} saved); the "
                f"continued run is not the same as an uninterrupted one")
        if lead:
            say(f"resumed from step {start} ({extra.get('strategy', '?')} -> {strat.spec})")
    else:
        if resume and lead:
            say(f"--resume: no checkpoint in {ckdir}; starting from step 0")
        start, state = 0, prog.init(seed)

    ck = Checkpointer(ckdir, save_every=save_every or max(steps, 1), keep=keep) if ckdir else None

    def extra_at(step: int) -> dict[str, Any]:
        return {"data": batches.state_at(step), "strategy": strat.spec, FINGERPRINT_KEY: fingerprint,
                "model": cfg.name, "workload": workload.to_json(), "optimizer": dataclasses.asdict(opt),
                "seed": seed}

    flops_per_step = train_flops_per_token(cfg, workload.seq_len) * workload.tokens
    rows: list[dict[str, Any]] = []
    saved: list[int] = []
    mfile = open(metrics, "a") if (metrics and lead) else None  # noqa: SIM115 - closed in `finally`
    bar = _progress(steps, min(start, steps), progress and lead)
    try:
        if bar:
            bar[0].start()
        batch = batches(start) if start < steps else None
        t_prev = time.perf_counter()
        for s in range(start, steps):
            state, out = prog.step_fn(state, batch)
            batch = batches(s + 1) if s + 1 < steps else None  # host work overlaps the device step
            loss = _scalar(out["loss"])  # waits for the step
            t = time.perf_counter()
            dt, first = t - t_prev, s == start
            tps = None if first else workload.tokens / dt
            mfu = (None if first or not peak["peak_flops_per_device"]
                   else flops_per_step / (dt * attached * peak["peak_flops_per_device"]))
            row = {"step": s + 1, "loss": loss, "tokens_per_s": tps, "mfu": mfu, "step_time_s": dt,
                   "compile": first}
            rows.append(row)
            if mfile:
                mfile.write(json.dumps({**row, "time": time.time()}) + "\n")
                mfile.flush()
            if bar:
                info = f"loss {loss:.4f}" + (f"  {tps:,.0f} tok/s" if tps else "") + (
                    f"  MFU {mfu:.1%}" if mfu is not None else "")
                bar[0].update(bar[1], completed=s + 1, info=info)
            if not math.isfinite(loss) and lead:
                say(f"warning: loss is {loss} at step {s + 1}")
            if ck is not None and ck.save(s + 1, state, extra_at(s + 1), force=s + 1 == steps):
                saved.append(s + 1)
            t_prev = time.perf_counter()  # a checkpoint's device-to-host copy is not step time
        if ck is not None:
            ck.wait()
    finally:
        if bar:
            bar[0].stop()
        if mfile:
            mfile.close()
        if ck is not None:
            ck.close()

    kept = set(_existing_steps(ckdir)[0]) if ckdir else set()
    timed = [r for r in rows if not r["compile"]]
    mean_dt = sum(r["step_time_s"] for r in timed) / len(timed) if timed else None
    summary = {
        "timed_steps": len(timed),
        "mean_step_time_s": mean_dt,
        "tokens_per_s": workload.tokens / mean_dt if mean_dt else None,
        "mfu": (flops_per_step / (mean_dt * attached * peak["peak_flops_per_device"])
                if mean_dt and peak["peak_flops_per_device"] else None),
        "compile_step_time_s": rows[0]["step_time_s"] if rows and rows[0]["compile"] else None,
    }
    result = {
        "model": cfg.name,
        "strategy": strat.spec,
        "devices": attached,
        "process_count": jax.process_count(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "workload": workload.to_json(),
        "layout_source": layout.source,
        "attention": impl or "xla",
        "steps": rows,
        "checkpoint": [{"step": s, "path": os.path.join(ckdir, str(s))} for s in saved if s in kept],
        "resumed_from": resume_step,
        "final_step": rows[-1]["step"] if rows else start,
        "summary": summary,
        "mfu_basis": peak,
        "train_flops_per_token": train_flops_per_token(cfg, workload.seq_len),
        "dropped_rules": dropped,
        "data": data,
    }
    if return_state:
        result["state"] = state
    return result

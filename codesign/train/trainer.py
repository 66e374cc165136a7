"""`run_training`: execute one layout (a plan's chosen candidate or a `--strategy` spec) for real.

One run (`TrainRun`, the `codesign train` flags): resolve (model, workload, strategy) -> check the
devices -> build the `TrainProgram` (params initialized straight into the plan's shardings, or restored
from a checkpoint onto *this* run's shardings, whatever mesh the checkpoint was saved under) -> loop:
data source -> global batch array -> jitted step. Resume is bit-exact: the state pytree (params,
optimizer state, step) comes back exactly, the data loader position is saved with it, and a batch is a
pure function of (seed, step).

`--steps K` is the step to train *up to*: a fresh run does K steps; `--resume` continues from the
newest good checkpoint up to step K. The optimizer settings belong to the run, not to one invocation:
the learning-rate horizon is `--schedule-steps` (default: K on a fresh run), and `--resume` keeps the
checkpoint's settings unless a flag overrides them. So "5 steps with --schedule-steps 10, then resume
to 10" equals "10 steps", and resuming to a larger K continues on the saved schedule (past its horizon
optax holds the final learning rate) instead of jumping back up a stretched cosine.

Non-finite numbers. `--nan-policy stop` (default) stops at the first step whose loss is NaN or
Infinity, saving nothing from it: the checkpoints already on disk are the newest good ones, and the
Checkpointer refuses any non-finite state. `skip` runs a guarded step that keeps the previous params
and optimizer state when the loss or the updated state is non-finite (it costs one extra copy of the
state in device memory), counts the skipped batches, and stops after loop.MAX_CONSECUTIVE_SKIPS in a row.
Rows and metrics lines carry non-finite numbers as null, named in `"nonfinite"` (strict JSON).

Throughput: step i's time runs from step i-1's completion to step i's (the next batch is prepared on
the host while the device computes). The first step of a run includes compilation and is left out of
tokens/s and MFU. MFU = train_flops_per_token(cfg, seq_len) x tokens / (step time x devices x peak),
the peak coming from the attached chip's catalog entry (CPU: the catalog's nominal figure, labeled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

from codesign.arithmetic import train_flops_per_token
from codesign.config import ConfigError, ModelConfig, Workload, resolve_attention
from codesign.hardware.device_kind import catalog_match
from codesign.sharding.mesh import MeshSpec, check_slices
from codesign.sharding.strategy import Strategy, StrategyError
from codesign.state_layout import OptimizerConfig
from codesign.train.checkpoint import FINGERPRINT_KEY, Checkpointer, CheckpointError
from codesign.train.data import BatchMaker, make_source_factory
from codesign.train.errors import NonFiniteLoss, TrainError  # noqa: F401 - NonFiniteLoss: raised via loop
from codesign.train.loop import NAN_POLICIES, LoopSpec, guarded_step, run_loop, scalar, summarize
from codesign.train_step import TrainProgram

PARAM_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One training run, as `codesign train` describes it (one field per flag).

    Optimizer fields left None take the checkpoint's values on `resume`, else the defaults
    (OptimizerConfig's learning rate and warm-up; a schedule as long as `steps`).
    """

    model: str | ModelConfig
    steps: int  # train up to this step
    plan: str | dict | None = None  # exactly one of plan and strategy
    strategy: str | None = None
    devices: int | None = None  # must equal the attached count when given
    global_batch: int | None = None  # default: the plan's, else the preset's default workload
    seq_len: int | None = None
    param_dtype: str | None = None
    master_dtype: str | None = None  # default: the plan's (none for --strategy)
    attention: str | None = None  # default: the plan's (xla for --strategy)
    lr: float | None = None
    warmup_steps: int | None = None
    schedule_steps: int | None = None
    data: str = "synthetic"  # or a flat token file
    data_dtype: str = "uint16"
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    save_every: int | None = None  # default: only the last step
    keep: int = 3
    nan_policy: str = "stop"
    metrics: str | None = None  # JSON lines, appended
    hardware: str | None = None  # catalog name for the MFU peak (default: from the device kind)
    slices: int | None = None  # TPU multi-slice: checked against the layout and the devices' slices
    progress: bool = False


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


def resolve_layout(
    model: str | ModelConfig,
    *,
    plan: str | dict | None = None,
    strategy: str | None = None,
    global_batch: int | None = None,
    seq_len: int | None = None,
    param_dtype: str | None = None,
    n_devices: int | None = None,
    master_dtype: str | None = None,
) -> Layout:
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
            print(
                f"note: the plan was made for model {planned_model!r}; training {cfg.name!r}", file=sys.stderr
            )
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
    if master_dtype:
        base["master_dtype"] = master_dtype
    return Layout(cfg, Workload(**base), strat, where)


def check_executable(strategy: Strategy, attached: int) -> None:
    """Refuse layouts this trainer cannot execute on the attached devices."""
    if strategy.n_devices != attached:
        raise StrategyError(
            f"plan needs {strategy.n_devices} devices, {attached} attached (strategy {strategy.spec})"
        )


def attention_impl(choice: str) -> str:
    """`--attention` for the attached backend (`config.resolve_attention`): auto -> flash on GPU and
    TPU, xla on CPU; flash on CPU runs the reference path; cudnn needs an NVIDIA GPU."""
    backend = jax.default_backend()
    platform = "gpu" if backend in ("gpu", "cuda", "rocm") else backend
    impl = resolve_attention(choice, platform)
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(
            f"cuDNN attention needs an NVIDIA GPU, and this run is on {backend}; the plan may "
            f"have been costed for one. Pass --attention xla (or auto, or flash: on CPU its reference path) "
            f"to run here"
        )
    return impl


# -- programs (cached per process: a resumed or repeated run in one process reuses the compile) ---
_PROGRAMS: OrderedDict = OrderedDict()
_PROGRAM_CACHE_SIZE = 4


def get_program(
    cfg: ModelConfig, workload: Workload, strategy: Strategy, mesh, optimizer: OptimizerConfig
) -> TrainProgram:
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
_DTYPE_KEY = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "float32": "fp32", "fp32": "fp32"}


def peak_flops(compute_dtype: str, hardware: str | None = None) -> dict[str, Any]:
    """{"peak_flops_per_device", "hardware", "dtype", "nominal", "note"} for the attached chip (or
    `hardware`). peak is None when the chip is not in the catalog (MFU is then null)."""
    from codesign.hardware import load_hardware

    kind = jax.devices()[0].device_kind
    match = catalog_match(kind)
    name = hardware or (match.chip if match else None)
    dkey = _DTYPE_KEY.get(compute_dtype, compute_dtype)
    if name is None:
        return {
            "peak_flops_per_device": None,
            "hardware": None,
            "dtype": dkey,
            "nominal": False,
            "device_kind": kind,
            "note": f"device kind {kind!r} is not in the hardware catalog; pass --hardware NAME to get MFU",
        }
    hw = load_hardware(name)
    peak = hw.peak_flops.get(dkey) or hw.peak_flops.get("bf16")
    nominal = hw.platform == "cpu"
    note = (
        "CPU: MFU against the catalog's nominal 1 TFLOP/s per device; not a hardware figure"
        if nominal
        else f"{name} dense {dkey} peak from the hardware catalog"
    )
    return {
        "peak_flops_per_device": peak,
        "hardware": name,
        "dtype": dkey,
        "nominal": nominal,
        "device_kind": kind,
        "note": note,
    }


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


def _reader(directory: str, prog: TrainProgram | None = None) -> Checkpointer:
    """A read-only Checkpointer; with `prog`, one that reads into its layout (`_layout_args`)."""
    with _quiet_absl():
        return Checkpointer(directory, read_only=True, **(_layout_args(prog) if prog else {}))


def _layout_args(prog: TrainProgram) -> dict[str, Any]:
    """How a checkpoint meets `prog`'s layout: the padding rows of its stack, and states saved with or
    without a master copy of the params."""
    return {"rows": prog.logical_rows(prog.abstract_state), "adapt": prog.checkpoint_adapter}


def _existing_steps(directory: str) -> tuple[list[int], dict[str, Any] | None]:
    """Finished steps in a checkpoint directory and the newest readable step's metadata (reads only)."""
    if not os.path.isdir(directory):
        return [], None
    with _reader(directory) as ro:
        return ro.all_steps(), ro.newest_readable_extra()[1]


def preflight_checkpoint(directory: str, fingerprint: str, resume: bool) -> tuple[int | None, dict | None]:
    """Check a checkpoint directory against this run before anything is written: (the newest step,
    the newest readable metadata), or (None, None) to start fresh."""
    steps, extra = _existing_steps(directory)
    if not steps:
        return None, None
    if extra is not None and extra.get(FINGERPRINT_KEY) != fingerprint:
        raise CheckpointError(
            f"checkpoint directory {directory} (step {steps[-1]}) was written for "
            f"{extra.get('model', 'another model')!r}, whose architecture differs from this run's model; "
            f"use another --checkpoint-dir (nothing was changed)"
        )
    if not resume:
        raise TrainError(
            f"checkpoint directory {directory} already holds steps {steps}; pass --resume to "
            f"continue from step {steps[-1]}, or use another --checkpoint-dir"
        )
    return steps[-1], extra


def restore_state(
    prog: TrainProgram, directory: str, step: int | None = None
) -> tuple[int, Any, dict[str, Any]]:
    """Read a checkpoint onto `prog`'s shardings (whatever mesh it was saved under), verified:
    (step, state, extra)."""
    with _reader(directory, prog) as ck:
        r = ck.restore(step, prog.abstract_state, model_fingerprint=prog.cfg.fingerprint())
    return r.step, r.state, r.extra


def optimizer_for(run: TrainRun, saved: dict[str, Any] | None) -> tuple[OptimizerConfig, list[str]]:
    """This run's optimizer: explicit flags > the checkpoint's settings (resume) > defaults. Also the
    flags that change a saved setting (the continued run then differs from an uninterrupted one)."""
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    settings = {**dataclasses.asdict(OptimizerConfig()), "total_steps": max(run.steps, 1)}
    settings.update({k: v for k, v in (saved or {}).items() if k in fields})
    flags = {
        "learning_rate": ("--lr", run.lr),
        "warmup_steps": ("--warmup-steps", run.warmup_steps),
        "total_steps": ("--schedule-steps", run.schedule_steps),
    }
    changed = [flag for key, (flag, v) in flags.items() if v is not None and saved and saved.get(key, v) != v]
    settings.update({key: v for key, (_, v) in flags.items() if v is not None})
    return OptimizerConfig(**settings), changed


# -- the run -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Session:
    """What a run resolved before its first step (internal to run_training)."""

    run: TrainRun
    cfg: ModelConfig
    workload: Workload
    strategy: Strategy
    layout_source: str
    attention: str
    attached: int
    peak: dict[str, Any]
    factory: Callable[[int, int], Any]
    ckdir: str | None
    resume_step: int | None
    saved_extra: dict[str, Any] | None
    say: Callable[[str], None]
    lead: bool


def _prepare(run: TrainRun, say: Callable[[str], None]) -> _Session:
    """Resolve and check everything that can fail before a device is touched or a file is written."""
    if run.steps < 0:
        raise TrainError(f"--steps must be >= 0, got {run.steps}")
    if run.nan_policy not in NAN_POLICIES:
        raise TrainError(f"--nan-policy {run.nan_policy!r}; use one of {NAN_POLICIES}")
    if run.resume and not run.checkpoint_dir:
        raise TrainError("--resume needs --checkpoint-dir")
    if run.lr is not None and not (math.isfinite(run.lr) and run.lr > 0):
        raise TrainError(f"--lr must be a positive finite number, got {run.lr}")
    for flag, value, least in (
        ("--warmup-steps", run.warmup_steps, 0),
        ("--schedule-steps", run.schedule_steps, 1),
        ("--save-every", run.save_every, 1),
        ("--keep", run.keep, 1),
    ):
        if value is not None and value < least:
            raise TrainError(f"{flag} must be >= {least}, got {value}")
    attached = jax.device_count()
    layout = resolve_layout(
        run.model,
        plan=run.plan,
        strategy=run.strategy,
        global_batch=run.global_batch,
        seq_len=run.seq_len,
        param_dtype=run.param_dtype,
        n_devices=attached,
        master_dtype=run.master_dtype,
    )
    check_executable(layout.strategy, attached)
    check_slices(layout.strategy.mesh, jax.devices(), run.slices)
    if run.devices is not None and run.devices != attached:
        raise StrategyError(
            f"--devices {run.devices} given, but {attached} devices are attached"
            + (
                " (on a real accelerator --devices must equal the attached count)"
                if jax.default_backend() != "cpu"
                else ""
            )
        )
    impl = attention_impl(run.attention or layout.workload.attention)
    workload = dataclasses.replace(layout.workload, attention=impl)
    peak = peak_flops(workload.dtype, run.hardware)  # a bad --hardware fails before anything compiles
    factory = make_source_factory(
        run.data, layout.cfg.vocab_size, workload.seq_len, workload.global_batch, run.seed, run.data_dtype
    )  # a missing file fails here
    ckdir = os.path.abspath(run.checkpoint_dir) if run.checkpoint_dir else None
    resume_step, saved = (
        preflight_checkpoint(ckdir, layout.cfg.fingerprint(), run.resume) if ckdir else (None, None)
    )
    return _Session(
        run,
        layout.cfg,
        workload,
        layout.strategy,
        layout.source,
        impl or "xla",
        attached,
        peak,
        factory,
        ckdir,
        resume_step,
        saved,
        say,
        jax.process_index() == 0,
    )


def _initial_state(
    s: _Session, prog: TrainProgram, batches: BatchMaker, ck: Checkpointer | None
) -> tuple[int, Any, list[dict[str, Any]]]:
    """(first step, state, unreadable steps set aside): the newest good checkpoint or a fresh init."""
    if s.resume_step is None:
        if s.run.resume and s.lead:
            s.say(f"--resume: no checkpoint in {s.ckdir}; starting from step 0")
        return 0, prog.init(s.run.seed), []
    got = ck.restore(None, prog.abstract_state, model_fingerprint=s.cfg.fingerprint())
    set_aside = []
    for step, why in got.skipped:  # newer steps that failed: kept on disk, renamed out of the way
        moved = ck.set_aside(step)
        set_aside.append({"step": step, "reason": why, "moved_to": moved})
        if s.lead:
            s.say(
                f"warning: checkpoint {why}; resuming from step {got.step}, the newest good one "
                f"(step {step} kept as {moved})"
            )
    try:
        batches.restore(got.extra.get("data", {}))
    except ValueError as e:
        raise TrainError(str(e)) from None
    if int(scalar(got.state["step"])) != got.step:
        raise CheckpointError(f"checkpoint step {got.step} holds state step {int(scalar(got.state['step']))}")
    if s.lead:
        s.say(f"resumed from step {got.step} ({got.extra.get('strategy', '?')} -> {s.strategy.spec})")
    return got.step, got.state, set_aside


def _loop_spec(s: _Session) -> LoopSpec:
    return LoopSpec(
        steps=s.run.steps,
        nan_policy=s.run.nan_policy,
        tokens_per_step=s.workload.tokens,
        flops_per_step=train_flops_per_token(s.cfg, s.workload.seq_len) * s.workload.tokens,
        devices=s.attached,
        peak_flops_per_device=s.peak["peak_flops_per_device"],
        metrics=s.run.metrics,
        progress=s.run.progress,
        lead=s.lead,
    )


def run_training(
    run: TrainRun, *, return_state: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train with one layout on the attached devices; see the module docstring.

    Returns {"steps": [{"step","loss","tokens_per_s","mfu","step_time_s","compile"[,"skipped"]
    [,"nonfinite"]}], "checkpoint": [{"step","path"}], "devices", "strategy", "workload", "resumed_from",
    "set_aside", "final_step", "summary", "mfu_basis", "dropped_rules", ...}; with `return_state`, also
    "state" (the final state pytree). Raises NonFiniteLoss (a TrainError) when the run stops at a
    non-finite step.
    """
    s = _prepare(run, log or (lambda m: print(m, file=sys.stderr)))
    opt, changed = optimizer_for(run, (s.saved_extra or {}).get("optimizer"))
    if changed and s.lead:
        s.say(
            f"note: {', '.join(changed)} change the checkpoint's optimizer settings; the continued run "
            f"differs from an uninterrupted one"
        )
    prog = get_program(s.cfg, s.workload, s.strategy, build_mesh(s.strategy), opt)
    dropped = [str(d) for d in prog.dropped_rules]
    if s.lead:
        s.say(
            f"training {s.cfg.name} with {s.strategy.spec} on {s.attached} {jax.devices()[0].device_kind} "
            f"devices ({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); global batch "
            f"{s.workload.global_batch} x {s.workload.seq_len} tokens; from {s.layout_source}"
        )
        if s.strategy.size("pipeline") > 1:
            s.say(
                f"  pipeline: schedule={s.strategy.schedule} runs as the circular pipeline of "
                f"codesign.pipeline (all forward ticks, then all backward ticks; GPipe's activation memory)"
            )
        for d in dropped:
            s.say(f"  rule dropped: {d}")
    batches = BatchMaker(s.factory, s.workload.global_batch, s.workload.seq_len, prog.batch_sharding)

    def extra_at(step: int, loss: float | None) -> dict[str, Any]:
        return {
            "data": batches.state_at(step),
            "strategy": s.strategy.spec,
            FINGERPRINT_KEY: s.cfg.fingerprint(),
            "model": s.cfg.name,
            "workload": s.workload.to_json(),
            "optimizer": dataclasses.asdict(opt),
            "seed": run.seed,
            "loss": loss,
        }

    spec = _loop_spec(s)
    ck = (
        Checkpointer(
            s.ckdir,
            save_every=run.save_every or max(run.steps, 1),
            keep=run.keep,
            **_layout_args(prog),
        )
        if s.ckdir
        else None
    )
    try:
        start, state, set_aside = _initial_state(s, prog, batches, ck)
        step_fn = guarded_step(prog) if run.nan_policy == "skip" else prog.step_fn
        done = run_loop(spec, step_fn, batches, state, start, ck, extra_at, s.say)
    finally:
        if ck is not None:
            ck.close()
    kept = set(_existing_steps(s.ckdir)[0]) if s.ckdir else set()
    result = {
        "model": s.cfg.name,
        "strategy": s.strategy.spec,
        "devices": s.attached,
        "process_count": jax.process_count(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "workload": s.workload.to_json(),
        "layout_source": s.layout_source,
        "attention": s.attention,
        "optimizer": dataclasses.asdict(opt),
        "nan_policy": run.nan_policy,
        "steps": done.rows,
        "checkpoint": [{"step": k, "path": os.path.join(s.ckdir, str(k))} for k in done.saved if k in kept],
        "resumed_from": start if s.resume_step is not None else None,
        "set_aside": set_aside,
        "final_step": done.rows[-1]["step"] if done.rows else start,
        "summary": summarize(spec, done),
        "mfu_basis": s.peak,
        "train_flops_per_token": train_flops_per_token(s.cfg, s.workload.seq_len),
        "dropped_rules": dropped,
        "data": run.data,
    }
    if return_state:
        result["state"] = done.state
    return result

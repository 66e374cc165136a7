"""`codesign train` and `codesign validate`: arguments and thin handlers.

Nothing here imports JAX at module level: `main()` reads `args.emulate_devices` and
`args.use_accelerator` (set while parsing) before JAX starts. `--devices N` on CPU emulates N devices
in total, i.e. N / P per process in a P-process run; without `--devices`, the count the plan or the
strategy spec implies is emulated. The argparse actions below keep `emulate_devices` consistent
whichever order the flags come in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

from codesign.cli._common import add_slices_arg, console, print_json
from codesign.config import ATTENTION_CHOICES


class _EmulationAction(argparse.Action):
    """Store the value, then recompute `emulate_devices` = devices per process (CPU emulation)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _update_emulation(namespace)


def _plan_devices(path: str, train: bool) -> int | None:
    """Devices a plan file implies (train: its chosen candidate's mesh; validate: its hardware)."""
    from codesign.sharding.strategy import Strategy, StrategyError

    try:
        with open(path) as f:
            doc = json.load(f)
        if train:
            return Strategy.parse(doc["candidates"][doc["chosen"]]["strategy"]["spec"]).n_devices
        return int((doc.get("hardware") or {}).get("devices") or 0) or None
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, StrategyError):
        return None  # the handler reports the real problem


def _implied_devices(ns) -> int | None:
    from codesign.sharding.strategy import Strategy, StrategyError

    if getattr(ns, "plan", None):
        return _plan_devices(ns.plan, train=hasattr(ns, "strategy"))  # only `train` has --strategy
    if getattr(ns, "strategy", None):
        try:
            return Strategy.parse(ns.strategy).n_devices
        except StrategyError:
            return None
    return None


def _update_emulation(ns) -> None:
    devices = getattr(ns, "devices", None)
    if devices is None:
        devices = _implied_devices(ns)
    if devices is None:
        ns.emulate_devices = None
        return
    procs = getattr(ns, "num_processes", None)
    if procs is None:
        try:
            procs = int(os.environ.get("CODESIGN_NUM_PROCESSES") or 1)
        except ValueError:
            procs = 1
    procs = max(int(procs), 1)
    ns.emulate_devices = devices // procs if devices % procs == 0 else devices  # mismatch reported later


@contextlib.contextmanager
def _stdout_to_stderr():
    """While training, anything written to fd 1 (gloo's connection lines, C++ logs, stray prints) goes
    to stderr, so that `--json` leaves exactly one JSON document on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _user_error(e: Exception) -> Exception:
    from codesign.cli._common import UsageError

    return UsageError(str(e))


def _distributed(args) -> dict | None:
    from codesign.train.distributed import DistributedError, initialize, settings_from

    try:
        settings = settings_from(args.coordinator, args.num_processes, args.process_id)
        if settings is not None and args.devices is not None and args.devices % settings.num_processes:
            raise DistributedError(
                f"--devices {args.devices} is not divisible by --num-processes {settings.num_processes}"
            )
        initialize(settings, timeout_s=args.init_timeout)
    except DistributedError as e:
        raise _user_error(e) from None
    return settings.to_json() if settings else None


def cmd_train(args) -> int:
    dist = _distributed(args)  # before JAX touches a device
    from codesign.train.checkpoint import CheckpointError
    from codesign.train.trainer import TrainError, TrainRun, run_training

    if args.devices is not None and args.devices < 1:
        raise _user_error(ValueError(f"--devices must be positive, got {args.devices}"))
    run = TrainRun(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainRun) if f.name != "progress"},
        progress=not args.no_progress,
    )
    try:
        with _stdout_to_stderr():
            result = run_training(run)
    except (TrainError, CheckpointError) as e:
        raise _user_error(e) from None
    result["distributed"] = dist
    if args.json:
        print_json(result)
        return 0
    from rich.table import Table

    out = console()
    t = Table(title=f"{result['model']} · {result['strategy']} · {result['devices']} devices")
    for col in ("step", "loss", "step time", "tokens/s", "MFU"):
        t.add_column(col, justify="right")
    for r in result["steps"]:
        loss = "skipped" if r.get("skipped") else "-" if r["loss"] is None else f"{r['loss']:.4f}"
        t.add_row(
            str(r["step"]),
            loss,
            f"{r['step_time_s'] * 1e3:.1f} ms" + (" (compile)" if r["compile"] else ""),
            f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
            f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
        )
    out.print(t)
    s, basis = result["summary"], result["mfu_basis"]
    if s["mean_step_time_s"]:
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a"
        out.print(
            f"mean over {s['timed_steps']} steps (compile step excluded): {s['mean_step_time_s'] * 1e3:.1f} ms, "
            f"{s['tokens_per_s']:,.0f} tokens/s, MFU {mfu} ({basis['note']})",
            markup=False,
        )
    if s["skipped_steps"]:
        out.print(f"skipped {len(s['skipped_steps'])} non-finite steps: {s['skipped_steps']}", markup=False)
    for c in result["checkpoint"]:
        out.print(f"checkpoint step {c['step']}: {c['path']}", markup=False)
    return 0


def cmd_validate(args) -> int:
    from codesign.train.trainer import TrainError
    from codesign.train.validate import run_validation

    try:
        result = run_validation(
            args.model,
            args.plan,
            top=args.top,
            steps=args.steps,
            warmup=args.warmup,
            attention=args.attention,
            seed=args.seed,
            slices=args.slices,
        )
    except TrainError as e:
        raise _user_error(e) from None
    if args.json:
        print_json(result)
        return 0
    from rich.table import Table

    out = console()
    t = Table(
        title=f"{result['model']} on {result['devices']} × {result['device_kind']}: estimated vs measured"
    )
    for col in ("strategy", "estimated", "measured (median)", "measured / estimated"):
        t.add_column(col, justify="right" if col != "strategy" else "left")
    for r in result["rows"]:
        t.add_row(
            r["spec"],
            f"{r['estimated_step_time_s'] * 1e3:.2f} ms",
            f"{r['measured_step_time_s'] * 1e3:.2f} ms",
            f"{r['ratio']:.2f}" if r["ratio"] is not None else "-",
        )
    out.print(t)
    rho = result["rank_correlation"]
    out.print(
        f"Spearman rank correlation (estimated vs measured order): "
        f"{result['rank_correlation_note'] if rho is None else f'{rho:.2f}'}",
        markup=False,
    )
    if result["skipped"]:
        out.print(
            f"{len(result['skipped'])} candidates skipped (--json lists them with the reason)", markup=False
        )
    if result["caveat"]:
        out.print(f"note: {result['caveat']}", markup=False)
    return 0


def register(add) -> None:
    sp = add("train", cmd_train, "train with a plan's layout (or a strategy spec) on the attached devices")
    sp.set_defaults(use_accelerator=True, emulate_devices=None)
    sp.add_argument("--model", required=True, help="preset name, YAML ModelConfig, or HF config.json")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--plan",
        action=_EmulationAction,
        help="a codesign.plan/v1 file: train its chosen candidate and workload",
    )
    src.add_argument(
        "--strategy", action=_EmulationAction, help="strategy spec, e.g. fsdp=4,tensor=2,remat=full"
    )
    sp.add_argument(
        "--devices",
        type=int,
        action=_EmulationAction,
        help="device count: emulated on CPU (default: what the plan/strategy needs); must equal "
        "the attached count on an accelerator",
    )
    sp.add_argument(
        "--steps",
        type=int,
        required=True,
        help="train up to this step (with --resume: continue from the checkpoint up to it)",
    )
    sp.add_argument("--checkpoint-dir", help="save checkpoints here (Orbax, async)")
    sp.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir"
    )
    sp.add_argument("--save-every", type=int, help="checkpoint every K steps (default: only the last step)")
    sp.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    sp.add_argument(
        "--nan-policy",
        choices=("stop", "skip"),
        default="stop",
        help="a NaN/Inf loss or update: stop (default; exit 2, nothing of it saved) or skip that "
        "batch's update and go on (at most 10 in a row; costs one more copy of the state)",
    )
    sp.add_argument("--global-batch", type=int, help="sequences per step (default: the plan's)")
    sp.add_argument("--seq-len", type=int, help="tokens per sequence (default: the plan's)")
    sp.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (AdamW, warmup + cosine; default 3e-4, or the checkpoint's with --resume)",
    )
    sp.add_argument("--warmup-steps", type=int, help="default 10, or the checkpoint's with --resume")
    sp.add_argument(
        "--schedule-steps",
        type=int,
        help="learning-rate schedule length (default: --steps, or the checkpoint's with --resume, so "
        "a run resumed to a larger --steps keeps its schedule)",
    )
    sp.add_argument("--data", default="synthetic", help="'synthetic' or a flat token file (PATH.bin)")
    sp.add_argument("--data-dtype", default="uint16", choices=("uint16", "uint32"))
    sp.add_argument("--seed", type=int, default=0, help="init and data seed")
    sp.add_argument("--metrics", help="append per-step metrics as JSON lines to this file")
    sp.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help="attention kernel: flash = cuDNN on GPU, Pallas splash on TPU, a plain-JAX reference on CPU; "
        "auto = flash on GPU/TPU, xla on CPU (default: the plan's, else xla)",
    )
    sp.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="weight dtype (compute is bf16)")
    sp.add_argument(
        "--master-dtype",
        choices=("float32",),
        help="keep a float32 master copy of bfloat16 weights in the optimizer, sharded like its state "
        "(Megatron-LM's and DeepSeek-V3's mixed precision; default: the plan's, else none)",
    )
    sp.add_argument("--hardware", help="catalog name for the MFU peak (default: from the device kind)")
    add_slices_arg(sp)
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sp.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process; or CODESIGN_COORDINATOR)")
    sp.add_argument(
        "--num-processes",
        type=int,
        action=_EmulationAction,
        help="processes in the run (or CODESIGN_NUM_PROCESSES)",
    )
    sp.add_argument("--process-id", type=int, help="this process's index (or CODESIGN_PROCESS_ID)")
    sp.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for all processes")

    sp = add("validate", cmd_validate, "measure a plan's top candidates; estimated vs measured step time")
    sp.set_defaults(use_accelerator=True, emulate_devices=None)
    sp.add_argument("--model", required=True, help="preset name, YAML ModelConfig, or HF config.json")
    sp.add_argument("--plan", required=True, action=_EmulationAction, help="a codesign.plan/v1 file")
    sp.add_argument(
        "--devices",
        type=int,
        action=_EmulationAction,
        help="CPU: devices to emulate (default: the plan's hardware devices)",
    )
    sp.add_argument("--top", type=int, default=3, help="candidates to measure (default 3)")
    sp.add_argument("--steps", type=int, default=5, help="timed steps per candidate (median reported)")
    sp.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    sp.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help="attention kernel to measure (default: the one the plan was costed for)",
    )
    sp.add_argument("--seed", type=int, default=0)
    add_slices_arg(sp)

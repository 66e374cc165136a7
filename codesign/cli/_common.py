"""What every subcommand module shares: output (`--json`, tables), the progress bar, the model/hardware
arguments. The subcommand modules import this, never `codesign.cli` itself, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from codesign.config import ATTENTION_CHOICES, resolve_attention


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def print_json(doc: Any) -> None:
    """`--json`: exactly one strict JSON document on stdout.

    A non-finite number (a NaN loss, an infinite ratio) is written as null, and an object document gets
    `"non_finite": [paths]` naming each one, so a reader can tell null-as-missing from null-as-NaN.
    """
    from codesign.userfiles import finite_json

    safe, bad = finite_json(doc)
    if bad and isinstance(safe, dict):
        safe["non_finite"] = bad
    elif bad:  # a list document has no room for the flag; say it on stderr
        print(f"note: non-finite numbers written as null at {', '.join(bad[:8])}", file=sys.stderr)
    sys.stdout.write(json.dumps(safe, indent=1, allow_nan=False) + "\n")


def console():
    """The stdout console for tables: the terminal's width, or 160 columns when piped."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def print_wide(renderable) -> None:
    """Print a table at its natural width even when the terminal is narrower, so that no cell (a
    strategy spec people copy into --strategy) is cut to `…`; the terminal wraps the long lines instead."""
    from rich.console import Console
    from rich.measure import Measurement

    out = console()
    need = Measurement.get(out, out.options.update(width=100_000), renderable).maximum
    (out if need <= out.width else Console(width=need)).print(renderable)


def emit(args, payload: Any, render: Callable[[], Any] | None) -> None:
    if args.json:
        print_json(payload)
        return
    out = console()
    for item in render() if render else [json.dumps(payload, indent=1, default=str)]:
        out.print(item)


class ProgressBar:
    """A rich progress bar on stderr, driven by (label, done, total) callbacks.

    A search may stop before its budget (enough layouts verified): on a clean exit each bar's total
    shrinks to what was done and the label says so, so the bar ends full instead of frozen at 4/12.
    """

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[label], completed=done, total=total)

    def finish(self) -> None:
        for label, task_id in self.tasks.items():
            task = self.bar.tasks[task_id]
            if task.total is not None and task.completed < task.total:
                self.bar.update(
                    task_id,
                    total=task.completed,
                    description=f"{label} (done early: {task.total:.0f} allowed, fewer needed)",
                )

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        self.bar.__exit__(exc_type, exc, tb)


def progress() -> ProgressBar:
    """`with progress() as update: run(progress=update)`."""
    return ProgressBar()


# argparse types: a bad number is an argparse error (one line, exit 2) before anything runs.
def _number(kind, text: str, ok, want: str):
    import argparse
    import math

    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def nonneg_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a positive number")


def nonneg_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def int_list(text: str) -> list[int]:
    return [positive_int(t.strip()) for t in text.split(",") if t.strip()]


def add_slices_arg(sp) -> None:
    """`--slices K`: TPU multi-slice, the one definition every command that takes --hardware shares."""
    sp.add_argument(
        "--slices",
        type=positive_int,
        help="TPU multi-slice: split the devices into K equal ICI slices joined over DCN (the outermost "
        "data/fsdp axis spans them); default: a profile's `slices:`, else one slice when it fits",
    )


def add_model_hw_args(sp) -> None:
    sp.add_argument("--model", required=True, help="preset name, YAML ModelConfig, or HF config.json")
    sp.add_argument(
        "--hardware", required=True, help="catalog name (see `codesign hardware`) or YAML profile"
    )
    sp.add_argument("--devices", type=positive_int, required=True, help="device count N")
    add_slices_arg(sp)
    sp.add_argument("--global-batch", type=positive_int, help="sequences per step (default: 4 per device)")
    sp.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default 4096)")
    sp.add_argument(
        "--target",
        default="auto",
        choices=("auto", "analytic", "cpu", "tpu", "gpu", "attached"),
        help="where to compile: auto = tpu/gpu deviceless compilers when installed, else cpu; "
        "analytic = closed form only",
    )
    sp.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weight dtype (compute is bf16)",
    )
    sp.add_argument(
        "--master-dtype",
        choices=("float32",),
        help="a float32 master copy of bfloat16 weights in the optimizer, sharded like its state "
        "(Megatron-LM's and DeepSeek-V3's mixed precision)",
    )
    sp.add_argument(
        "--attention",
        default="xla",
        choices=ATTENTION_CHOICES,
        help="attention kernel to cost and compile: flash = cuDNN on GPU, Pallas splash on TPU (the cpu "
        "target compiles a plain-JAX reference); cudnn = cuDNN by name; auto = flash on GPU/TPU hardware",
    )


def add_matmul_dtype_arg(sp) -> None:
    sp.add_argument(
        "--matmul-dtype",
        default="bf16",
        choices=("bf16", "fp8"),
        help="GEMM precision to cost: fp8 prices weight matmuls at the FP8 rate and the MoE dispatch in "
        "FP8 (attention core, embedding, head, router, norms stay BF16), plus the quantization passes",
    )


def check_attention(attention: str, hw, target: str) -> None:
    """Fail fast on `--attention cudnn` where nothing can run or compile it.

    cuDNN's fused attention exists only on NVIDIA GPUs: the cpu target (XLA's host compiler) and TPU
    hardware would turn every candidate into the same compile error. The analytic target compiles
    nothing, so on GPU hardware it may still cost the flash kernel (a what-if for the GPU named by
    --hardware); on TPU or CPU hardware there is no cuDNN to cost.
    """
    from codesign import runtime

    if attention != "cudnn":
        return
    if hw.platform != "gpu":
        raise UsageError(
            f"cuDNN attention needs an NVIDIA GPU target; --hardware {hw.name} is {hw.platform} "
            f"hardware. Use --attention xla"
        )
    if target in ("analytic", "gpu") or (target == "attached" and runtime.nvidia_gpu_present()):
        return
    raise UsageError(
        f"cuDNN attention needs an NVIDIA GPU target; the {target} target cannot compile it. Use "
        f'--target gpu (deviceless CUDA compiler: pip install -e ".[gpu-aot]"), --target analytic '
        f"(costs it without compiling), or --attention xla"
    )


def check_host_devices(target: str, devices: int) -> None:
    """The cpu target emulates `devices` host devices; a user's XLA_FLAGS asking for another count is
    an error rather than silently replaced (runtime.check_host_device_flag)."""
    from codesign import runtime

    if target == "cpu":
        runtime.check_host_device_flag(devices, "the cpu target")


def resolve_target(args, hw) -> str:
    """The compile target a command will use (`auto` resolved), checked against the other flags."""
    from codesign.compile.target_names import resolve_target as resolve

    target = resolve(args.target, hw)
    check_attention(args.attention, hw, target)
    check_host_devices(target, args.devices)
    return target


def check_output_paths(*paths: str | None) -> None:
    """Before a long search: each output file's directory exists and is writable (not after it)."""
    import os

    for path in paths:
        if not path:
            continue
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise UsageError(
                f"cannot write {path!r}: directory {d!r} does not exist; create it or pick another path"
            )
        if not os.access(d, os.W_OK):
            raise UsageError(f"cannot write {path!r}: directory {d!r} is not writable")
        if os.path.isdir(path):
            raise UsageError(f"cannot write {path!r}: it is a directory; give a file name")


def resolve_model_hw(args):
    from codesign.config import default_workload
    from codesign.hardware import load_hardware
    from codesign.model_io import load_model_config

    cfg = load_model_config(args.model)
    hw = load_hardware(args.hardware, devices=args.devices, slices=args.slices)
    if args.devices < 1:
        raise UsageError(f"--devices must be positive, got {args.devices}")
    w = default_workload(cfg, args.devices, args.global_batch, args.seq_len)
    attention = resolve_attention(args.attention, hw.platform, cfg.attention_dropout)
    return (
        cfg,
        hw,
        dataclasses.replace(
            w,
            param_dtype=args.param_dtype,
            master_dtype=getattr(args, "master_dtype", None),
            attention=attention,
            matmul_dtype=getattr(args, "matmul_dtype", "bf16"),
        ),
    )

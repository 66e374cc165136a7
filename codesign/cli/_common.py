"""What every subcommand module shares: output (`--json`, tables), the progress bar, the model/hardware
arguments. The subcommand modules import this, never `codesign.cli` itself, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def print_json(doc: Any) -> None:
    """`--json`: exactly one JSON document on stdout."""
    json.dump(doc, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def console():
    """The stdout console for tables: the terminal's width, or 160 columns when piped."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def emit(args, payload: Any, render: Callable[[], Any] | None) -> None:
    if args.json:
        print_json(payload)
        return
    out = console()
    for item in (render() if render else [json.dumps(payload, indent=1, default=str)]):
        out.print(item)


def progress():
    """A rich progress bar on stderr, driven by (label, done, total) callbacks."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = prog.add_task(label, total=total)
        prog.update(tasks[label], completed=done, total=total)

    return prog, update


def add_model_hw_args(sp) -> None:
    sp.add_argument("--model", required=True, help="preset name, YAML ModelConfig, or HF config.json")
    sp.add_argument("--hardware", required=True, help="catalog name (see `codesign hardware`) or YAML profile")
    sp.add_argument("--devices", type=int, required=True, help="device count N")
    sp.add_argument("--global-batch", type=int, help="sequences per step (default: 4 per device)")
    sp.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096)")
    sp.add_argument("--target", default="auto", choices=("auto", "analytic", "cpu", "tpu", "gpu", "attached"))
    sp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="master-weight dtype (compute is bf16)")
    sp.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                    help="attention kernel to cost and compile (cudnn: fused flash attention on NVIDIA GPUs)")


def resolve_model_hw(args):
    from codesign.hardware import load_hardware
    from codesign.model_io import load_model_config
    from codesign.planner import default_workload

    cfg = load_model_config(args.model)
    hw = load_hardware(args.hardware, devices=args.devices)
    if args.devices < 1:
        raise UsageError(f"--devices must be positive, got {args.devices}")
    w = default_workload(cfg, args.devices, args.global_batch, args.seq_len)
    return cfg, hw, dataclasses.replace(w, param_dtype=args.param_dtype, attention=args.attention)

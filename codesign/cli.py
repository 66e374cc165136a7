"""The `codesign` command line: parses arguments and calls one library function per command.

JAX is imported only after `runtime.configure` has chosen the platform and device count, so that
`--devices N` can emulate N CPU devices. `--json` prints exactly one JSON document on stdout;
tables, progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from codesign import runtime


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


def _emit(args, payload: Any, render: Callable[[], Any] | None) -> None:
    if args.json:
        print_json(payload)
        return
    out = console()
    for item in (render() if render else [json.dumps(payload, indent=1, default=str)]):
        out.print(item)


# -- commands ---------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from codesign.arithmetic import param_counts
    from codesign.presets import get_preset, preset_names

    rows = []
    for name in preset_names():
        cfg = get_preset(name)
        pc = param_counts(cfg)
        rows.append({"name": name, "family": cfg.family, "attention": cfg.attention, "layers": cfg.layers,
                     "hidden": cfg.hidden, "params_total": pc.total, "params_active": pc.active,
                     "source": cfg.source})

    def render():
        from rich.table import Table

        t = Table(title="codesign model presets")
        for col in ("name", "family", "attention", "layers", "hidden", "params total", "active / token", "source"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["name"], r["family"], r["attention"], str(r["layers"]), str(r["hidden"]),
                      _human(r["params_total"]), _human(r["params_active"]), r["source"])
        return [t]

    _emit(args, rows, render)
    return 0


def cmd_hardware(args) -> int:
    from codesign.hardware import list_hardware

    items = [h.to_json() for h in list_hardware()]

    def render():
        from rich.table import Table

        t = Table(title="codesign hardware catalog")
        for col in ("name", "kind", "bf16", "fp8", "HBM", "HBM BW", "network levels"):
            t.add_column(col, overflow="fold")
        for h in items:
            levels = "; ".join(f"{lv['name']}×{lv['group_size']} {lv['bytes_per_s'] / 1e9:.0f} GB/s"
                               for lv in h["levels"])
            pf = h["peak_flops"]
            t.add_row(h["name"], h["kind"], _human(pf.get("bf16", 0), "FLOP/s"),
                      _human(pf["fp8"], "FLOP/s") if pf.get("fp8") else "-", _human(h["hbm_bytes"], "B", 1024),
                      _human(h["hbm_bytes_per_s"], "B/s"), levels)
        return [t]

    _emit(args, items, render)
    return 0


def _human(x: float, unit: str = "", base: int = 1000) -> str:
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(x) < base:
            return f"{x:.3g} {suffix}{unit}".strip()
        x /= base
    return f"{x:.3g} Z{unit}"


# -- argument parsing -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codesign", description="Pick the parallelism layout before you rent the pod.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(fn=fn)
        return sp

    add("models", cmd_models, "list the model presets")
    add("hardware", cmd_hardware, "list the hardware catalog")
    _register_more(add)
    return p


def _register_more(add) -> None:
    """Commands whose implementations live in their own modules (planner, trainer, explorer...)."""
    from codesign import cli_commands

    cli_commands.register(add)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime.configure(cpu_devices=getattr(args, "emulate_devices", None),
                      use_accelerator=getattr(args, "use_accelerator", False))
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known user errors become one clear line; the rest re-raise
        if _is_user_error(e):
            print(f"codesign {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    from codesign.config import ConfigError
    from codesign.sharding.rules import RulesError
    from codesign.sharding.strategy import StrategyError

    known: tuple[type, ...] = (UsageError, ConfigError, StrategyError, RulesError, FileNotFoundError)
    try:
        from codesign.hardware import HardwareError
        from codesign.hardware.topology import TopologyError
        from codesign.train.checkpoint import CheckpointError
        from codesign.train.distributed import DistributedError
        from codesign.train.trainer import TrainError

        known += (HardwareError, TopologyError, CheckpointError, DistributedError, TrainError)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, known)

"""The `codesign` command line: parses arguments and calls one library function per command.

JAX is imported only after `runtime.configure` has chosen the platform and device count, so that
`--devices N` can emulate N CPU devices. `--json` prints exactly one JSON document on stdout;
tables, progress and logs go to stderr.

Each subcommand module has a `register(add)`; `SUBCOMMANDS` lists them all, in help order.
"""

from __future__ import annotations

import argparse
import sys

from codesign import runtime
from codesign.cli import compile as compile_cmd
from codesign.cli import explore, info, plan, train
from codesign.cli._common import UsageError, console, print_json

__all__ = ["SUBCOMMANDS", "UsageError", "build_parser", "console", "main", "print_json"]

SUBCOMMANDS = (info, plan, compile_cmd, train, explore)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codesign", description="Pick the parallelism layout before you rent the pod.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(fn=fn)
        return sp

    for module in SUBCOMMANDS:
        module.register(add)
    return p


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
    from codesign.hardware import HardwareError
    from codesign.hardware.topology import TopologyError
    from codesign.sharding.rules import RulesError
    from codesign.sharding.strategy import StrategyError
    from codesign.train.checkpoint import CheckpointError
    from codesign.train.distributed import DistributedError
    from codesign.train.trainer import TrainError

    known: tuple[type, ...] = (UsageError, ConfigError, StrategyError, RulesError, FileNotFoundError, HardwareError,
                               TopologyError, CheckpointError, DistributedError, TrainError)
    return isinstance(e, known)

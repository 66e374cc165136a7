"""The `codesign` command line: parses arguments and calls one library function per command.

JAX is imported only after `runtime.configure` has chosen the platform and device count, so that
`--devices N` can emulate N CPU devices. `--json` prints exactly one JSON document on stdout;
tables, progress and logs go to stderr.

Each subcommand module has a `register(add)`; `SUBCOMMANDS` lists them all, in help order. A bad input
(any of `user_error_types()`) is printed as one line, `codesign <command>: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from codesign import runtime
from codesign.cli import compile as compile_cmd
from codesign.cli import explore, info, plan, train
from codesign.cli._common import UsageError, console, print_json

__all__ = ["SUBCOMMANDS", "UsageError", "build_parser", "console", "main", "print_json", "user_error_types"]

SUBCOMMANDS = (info, plan, compile_cmd, train, explore)


def version() -> str:
    from importlib import metadata

    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"codesign {v('codesign')} (jax {v('jax')}, jaxlib {v('jaxlib')}, flax {v('flax')})"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line; the usage it would print is one `--help` away.
    Subcommand parsers are of this class too (add_subparsers takes the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="codesign", description="Pick the parallelism layout before you rent the pod.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(fn=fn)
        return sp

    for module in SUBCOMMANDS:
        module.register(add)
    _show_defaults(p)
    return p


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append `(default: X)` to every option's help that has a real default and does not state it already.

    (ArgumentDefaultsHelpFormatter would also print `default: None` and skip options without help.)
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                _show_defaults(sp)
            continue
        if not action.option_strings or any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        text = action.help or ""
        if "default" not in text:
            action.help = f"{text} (default: %(default)s)".strip()


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every error type that means "bad input": printed as one line, never as a traceback.

    Imported here, after `runtime.configure`, because some of these modules import JAX.
    tests/test_bad_input.py checks that each `*Error(ValueError)` class in codesign is covered.
    """
    from codesign.compile.devices import TargetError
    from codesign.compile.flags import FlagError
    from codesign.compile.measure import ExecutorError
    from codesign.config import ConfigError
    from codesign.explore.sweep import SweepError
    from codesign.hardware import HardwareError
    from codesign.hardware.topology import TopologyError
    from codesign.sharding.rules import RulesError
    from codesign.sharding.strategy import StrategyError
    from codesign.train.checkpoint import CheckpointError
    from codesign.train.distributed import DistributedError
    from codesign.train.trainer import TrainError

    return (
        UsageError,
        ConfigError,
        StrategyError,
        RulesError,
        HardwareError,
        TopologyError,
        TargetError,
        SweepError,
        CheckpointError,
        DistributedError,
        TrainError,
        ExecutorError,
        FlagError,
    )


def _is_user_error(e: BaseException) -> bool:
    from codesign.config import ConfigError

    if isinstance(e, (UsageError, ConfigError, FileNotFoundError)):  # decided without importing JAX
        return True
    if isinstance(e, OSError) and e.filename:  # a missing plan, an unwritable --out: the user's to fix
        return True
    return isinstance(e, user_error_types())


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror and not isinstance(e, FileNotFoundError):
        return f"{e.strerror}: {e.filename!r}"  # e.g. writing --out into a missing or read-only directory
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runtime.configure(
            cpu_devices=getattr(args, "emulate_devices", None),
            use_accelerator=getattr(args, "use_accelerator", False),
        )
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known user errors become one clear line; the rest re-raise
        if _is_user_error(e):
            print(f"codesign {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise

"""The design as CI checks it: the layer contract (import-linter), no import cycle, formatted code."""

import logging
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_contract_holds():
    from importlinter import cli

    # import-linter configures logging with disable_existing_loggers, which would silence codesign's
    # loggers for every later test in this process (test_hf_import reads their warnings): restore them.
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    was = [lg.disabled for lg in loggers]
    try:
        assert cli.lint_imports(config_filename=os.path.join(ROOT, "pyproject.toml")) == 0
    finally:
        for lg, disabled in zip(loggers, was):
            lg.disabled = disabled


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m) & modules:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_between_modules():
    import grimp

    graph = grimp.build_graph("codesign")
    # A package's __init__ re-exporting its own modules is not a cycle between concepts.
    modules = {m for m in graph.modules if not graph.find_children(m)}
    assert _cycles(graph, modules) == []


def test_code_is_ruff_formatted_and_clean():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    paths = [os.path.join(ROOT, p) for p in ("codesign", "tests", "experiments")]
    lint = subprocess.run([ruff, "check", "--quiet", *paths], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "--quiet", *paths], capture_output=True, text=True, check=False
    )
    assert fmt.returncode == 0, "run `ruff format codesign tests experiments`:\n" + fmt.stdout[-3000:]
    assert sys.version_info >= (3, 10)

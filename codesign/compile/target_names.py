"""The compile targets by name, and `auto` resolved: imports nothing from JAX, so that a cached plan
(codesign.planner.plan_cache) is served without starting it. `codesign.compile.targets` and `devices`
re-export all of this."""

from __future__ import annotations

import importlib.util
from typing import Any

# "analytic" is the closed form (codesign.closed_form): an instrument like the compilers, run in-process.
TARGETS = ("analytic", "cpu", "tpu", "gpu", "attached")


class TargetError(ValueError):
    """An unknown target, or a target this process cannot compile for (the message says what to do)."""


def unknown_target(target: str) -> TargetError:
    """The error for a target name that is not one of `TARGETS` (nor ``auto``)."""
    return TargetError(f"unknown compile target {target!r}; use auto, {', '.join(TARGETS)}")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def gpu_aot_available() -> bool:
    """The deviceless CUDA compiler ships in the jax CUDA plugin (the gpu-aot extra)."""
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def resolve_target(target: str, hardware: Any) -> str:
    """``auto`` -> tpu (TPU hardware, libtpu importable) | gpu (GPU hardware, gpu-aot importable) | cpu."""
    if target in TARGETS:
        return target
    if target != "auto":
        raise unknown_target(target)
    if hardware.platform == "tpu" and libtpu_available():
        return "tpu"
    if hardware.platform == "gpu" and gpu_aot_available():
        return "gpu"
    return "cpu"

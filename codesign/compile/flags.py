"""The XLA flags a compile target carries: the overlap settings large JAX runs turn on.

A compile target is the compiler *and* its settings. Published MaxText runs set these flags (TPU through
``LIBTPU_INIT_ARGS``, GPU through ``XLA_FLAGS``), so a prediction of those runs must compile with them:

* TPU, from MaxText's v5p/v5e benchmark scripts (``end_to_end/tpu/*.sh``, ``MaxText/configs/*``) and the
  Cloud TPU reproducibility recipes: async collective fusion (all-gathers included, over several steps),
  compute/collective overlap on the TensorCore, async all-gather, and the data-parallel all-reduce
  optimization. Collective matmul (windowed einsum) is NOT in the default set: MaxText enables it per
  config, and several of its inference configs turn it off. Add it with an override.
* GPU, from NVIDIA JAX-Toolbox's ``GPU_performance.md`` and MaxText's GPU configs: the latency-hiding
  scheduler and pipelined all-gather / reduce-scatter / all-reduce (FSDP weight gathers and gradient
  reductions overlapped across the scanned layers).
* CPU: none (XLA:CPU runs collectives synchronously; there is nothing to overlap).

The flags go to ``Lowered.compile(compiler_options=...)`` (per compile, so parallel workers and the
planner's own process never share them through the environment). A flag this compiler does not know
(``INVALID_ARGUMENT: No such compile option``) is dropped and the compile retried: the report records
the flags applied and names each one dropped, and the cache key folds in the requested set.

Measured with libtpu 0.0.52 (jax 0.10.2, deviceless v5e:2x4): every TPU default below and both
windowed-einsum flags are accepted as compile options and take effect (turning
``xla_tpu_enable_async_collective_fusion`` off removes the async collective fusions from the scheduled
module; libtpu already has it on by default); ``xla_enable_async_reduce_scatter`` is rejected ("No such
compile option"). On v5p (deviceless v5p:2x2x2) libtpu refuses AllGather continuation fusion with
FAILED_PRECONDITION ("not supported/recommended on platforms other than TPU v5e ... disable it with
xla_tpu_enable_async_collective_fusion=false"), so that flag is a v5e-only default, and a compile
error that names one of the flags passed drops the flags it names and retries. The GPU set was not
compiled here (no CUDA plugin on this machine).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

Flags = tuple[tuple[str, str], ...]

# Default overlap settings per compiler platform ("attached" takes its hardware's platform).
OVERLAP_FLAGS: dict[str, Flags] = {
    "tpu": (
        ("xla_tpu_enable_async_collective_fusion", "true"),
        ("xla_tpu_enable_async_collective_fusion_fuse_all_gather", "true"),
        ("xla_tpu_enable_async_collective_fusion_multiple_steps", "true"),
        ("xla_tpu_overlap_compute_collective_tc", "true"),
        ("xla_enable_async_all_gather", "true"),
        ("xla_tpu_enable_data_parallel_all_reduce_opt", "true"),
        ("xla_tpu_data_parallel_opt_different_sized_ops", "true"),
    ),
    "gpu": (
        ("xla_gpu_enable_latency_hiding_scheduler", "true"),
        ("xla_gpu_enable_pipelined_all_gather", "true"),
        ("xla_gpu_enable_pipelined_reduce_scatter", "true"),
        ("xla_gpu_enable_pipelined_all_reduce", "true"),
    ),
    "cpu": (),
}
# Collective matmul: the all-gather / reduce-scatter of a tensor-parallel matmul decomposed into a loop
# of permutes, each overlapped with a slice of the matmul. Named so that an override can ask for it.
COLLECTIVE_MATMUL_FLAGS: dict[str, Flags] = {
    "tpu": (
        ("xla_tpu_enable_windowed_einsum_for_all_gather", "true"),
        ("xla_tpu_enable_windowed_einsum_for_reduce_scatter", "true"),
    ),
    "gpu": (
        ("xla_gpu_threshold_for_windowed_einsum_mib", "0"),
        ("xla_gpu_multi_streamed_windowed_einsum", "true"),
    ),
}
# libtpu 0.0.52 refuses AllGather continuation fusion on any TPU but v5e (FAILED_PRECONDITION).
V5E_ONLY = frozenset({"xla_tpu_enable_async_collective_fusion_fuse_all_gather"})
_REJECTED = re.compile(r"No such compile option:\s*'([^']+)'")
_FLAG_NAME = re.compile(r"\bxla_[a-z0-9_]+")
_TRUE = ("true", "1")


class FlagError(ValueError):
    """A malformed flag override (the message says the expected form)."""


def platform_of(target: str, hardware_platform: str) -> str:
    """The compiler whose flags apply: the target itself, or the hardware's platform for `attached`."""
    return hardware_platform if target == "attached" else target


def default_flags(target: str, hardware_platform: str, tpu_generation: str | None = None) -> Flags:
    flags = OVERLAP_FLAGS.get(platform_of(target, hardware_platform), ())
    if tpu_generation and tpu_generation != "v5e":
        flags = tuple(kv for kv in flags if kv[0] not in V5E_ONLY)
    return flags


def parse_flags(items: Iterable[str]) -> Flags:
    """``["xla_x=true", "--xla_y="]`` -> ``(("xla_x", "true"), ("xla_y", ""))`` (an empty value removes
    a default); malformed items raise."""
    out = []
    for item in items:
        key, sep, value = item.strip().lstrip("-").partition("=")
        if not sep or not key or " " in key:
            raise FlagError(
                f"XLA flag {item!r} is not NAME=VALUE; write it like xla_tpu_overlap_compute_collective_tc=true"
            )
        out.append((key, value))
    return tuple(out)


def resolve_flags(
    target: str,
    hardware_platform: str,
    override: Mapping[str, str] | Flags | None = None,
    tpu_generation: str | None = None,
) -> Flags:
    """The flags a compile uses: the platform's (and TPU generation's) overlap defaults, then
    `override` on top (a value of ``""`` removes a default). Sorted, so that the same settings always
    give the same cache key."""
    flags = dict(default_flags(target, hardware_platform, tpu_generation))
    items = override.items() if isinstance(override, Mapping) else (override or ())
    for key, value in items:
        if value == "":
            flags.pop(key, None)
        else:
            flags[key] = str(value)
    return tuple(sorted(flags.items()))


def refused_flags(message: str, flags: Mapping[str, str]) -> list[str]:
    """The flags of `flags` a compile error refuses: an unknown option, or flags the message names
    (a flag named there also refuses the flags it prefixes: libtpu names the parent
    ``xla_tpu_enable_async_collective_fusion`` when it refuses ``..._fuse_all_gather``). [] for
    an error that has nothing to do with the flags."""
    m = _REJECTED.search(message)
    if m:
        return [m.group(1)] if m.group(1) in flags else []
    named = set(_FLAG_NAME.findall(message))
    return [k for k in flags if any(k.startswith(n) for n in named)]


def collective_matmul_on(flags: Flags | Mapping[str, str]) -> bool:
    """Whether the flags turn on collective matmul (windowed einsum) for the tensor-parallel matmuls."""
    d = dict(flags.items() if isinstance(flags, Mapping) else flags)
    tpu = any(d.get(k, "").lower() in _TRUE for k, _ in COLLECTIVE_MATMUL_FLAGS["tpu"])
    try:  # XLA's default threshold is effectively infinite (100000 MiB): no matmul qualifies
        gpu = float(d.get("xla_gpu_threshold_for_windowed_einsum_mib", "inf")) < 1e5
    except ValueError:
        gpu = False
    return tpu or gpu

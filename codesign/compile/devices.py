"""The devices a compile target builds its mesh from.

Targets (DESIGN.md):

* ``cpu``: XLA's host platform emulating N devices (``--xla_force_host_platform_device_count``, which
  must be set before JAX starts: run through :mod:`codesign.compile.worker` or the CLI's ``--devices``).
* ``tpu``: the deviceless TPU compiler in ``libtpu`` for the slice ``tpu_topology_name(gen, n)``, or
  for K such slices over DCN (``get_topology_desc(..., num_slices=K)``) when the hardware has K slices
  (``--slices K``, or more chips than one slice holds). The topology's devices are sorted by slice,
  then ``id``, before the mesh is built (the catalog's torus placement assumes that x varies fastest
  over ids); over several slices that row-major order is the block structure
  ``create_hybrid_device_mesh`` builds, the outermost axes split across slices. v4 is compiled with ``chip_config_name="megacore"``: libtpu
  otherwise exposes each v4 chip as 2 devices (one per TensorCore), whereas JAX on a real v4 sees one
  megacore device per chip; with megacore, devices = chips = the strategy's device count.
* ``gpu``: the deviceless CUDA compiler (the ``gpu-aot`` extra, ``jax[cuda12]``) with a
  ``GpuTargetConfig`` text proto shipped in ``codesign/data/gpu_targets``.
* ``attached``: the devices this process really has.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from codesign.compile.target_names import (  # noqa: F401  (re-exported for the device builders' callers)
    TARGETS,
    TargetError,
    gpu_aot_available,
    libtpu_available,
    unknown_target,
)
from codesign.hardware.catalog import Hardware

COMPILERS = ("cpu", "tpu", "gpu", "attached")
GPU_AOT_INSTALL_HINT = 'pip install -e ".[gpu-aot]"'
# catalog chip name -> GpuTargetConfig text proto in codesign/data/gpu_targets
GPU_TARGET_CONFIGS = {
    "a100-sxm-80g": "a100_sxm_80g.txtpb",
    "h100-sxm": "h100_sxm.txtpb",
    "h800-sxm": "h100_sxm.txtpb",
    "h200-sxm": "h200_sxm.txtpb",
    "b200-sxm": "b200.txtpb",
}
GPUS_PER_NODE = 8


def valid_tpu_count(hardware: Hardware, n: int) -> bool:
    """n chips form one slice, or the hardware's K equal slices (`Hardware.slices`)."""
    from codesign.hardware.topology import TopologyError, split_slices

    try:
        split_slices(hardware.tpu_generation or "", n, hardware.slices)
        return True
    except TopologyError:
        return False


def prepare_libtpu_env() -> None:
    """Environment for a deviceless TPU compile; effective when it runs before libtpu initializes (the
    first topology request). Silences libtpu's host-discovery noise, and lets several processes load
    libtpu at once: libtpu otherwise takes /tmp/libtpu_lockfile and a second process (parallel workers,
    another planner) fails with "Internal error when accessing libtpu multi-process lockfile". No TPU
    is driven by a deviceless compile, so sharing is safe."""
    from codesign.runtime import accelerator_present, silence_tpu_runtime_noise

    silence_tpu_runtime_noise()
    if not accelerator_present():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(hardware: Hardware, n: int) -> list:
    """The deviceless devices of n chips: one slice, or the hardware's K slices (slice-major)."""
    from codesign import _compat
    from codesign.hardware.topology import TopologyError, split_slices

    gen = hardware.tpu_generation
    if not gen:
        raise TargetError(f"target tpu needs TPU hardware; {hardware.name} is {hardware.platform}")
    if not libtpu_available():
        raise TargetError('target tpu needs libtpu (pip install -e ".[dev]" installs it)')
    try:
        topo, slices = split_slices(gen, n, hardware.slices)
    except TopologyError as e:
        raise TargetError(f"target tpu: {e}") from None
    prepare_libtpu_env()
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if gen == "v4" else {}
    if slices > 1:
        kwargs["num_slices"] = slices
    desc = _compat.get_topology_desc(platform="tpu", topology_name=topo.name, **kwargs)
    devices = sorted(desc.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
    if len(devices) != n:
        raise TargetError(
            f"libtpu topology {topo.name} x {slices} slice(s) has {len(devices)} devices, "
            f"expected one per chip ({n})"
        )
    return devices


def gpu_target_config_text(hardware: Hardware) -> str:
    fname = GPU_TARGET_CONFIGS.get(hardware.chip.name)
    if fname is None:
        raise TargetError(
            f"no GpuTargetConfig for chip {hardware.chip.name!r}; shipped: {sorted(GPU_TARGET_CONFIGS)}"
        )
    return resources.files("codesign").joinpath(f"data/gpu_targets/{fname}").read_text()


def gpu_topology_string(n: int, per_node: int = GPUS_PER_NODE) -> str:
    """'<slices>x<hosts>x<devices per host>' for n GPUs, filling nodes of `per_node`."""
    per = min(n, per_node)
    if n % per:
        raise TargetError(f"{n} GPUs do not fill nodes of {per_node}")
    return f"1x{n // per}x{per}"


def gpu_devices(hardware: Hardware, n: int) -> list:
    from codesign import _compat

    if hardware.platform != "gpu":
        raise TargetError(f"target gpu needs GPU hardware; {hardware.name} is {hardware.platform}")
    if not gpu_aot_available():
        raise TargetError(
            f"target gpu needs the deviceless CUDA compiler: {GPU_AOT_INSTALL_HINT} (jax[cuda12], ~5.6 GB)"
        )
    per_node = GPUS_PER_NODE
    if hardware.levels and hardware.levels[0].max_group_size:
        per_node = min(GPUS_PER_NODE, hardware.levels[0].max_group_size)
    topo = _compat.get_topology_desc(
        platform="cuda",
        target_config=gpu_target_config_text(hardware),
        topology=gpu_topology_string(n, per_node),
    )
    return sorted(topo.devices, key=lambda d: d.id)


def target_devices(target: str, hardware: Hardware, n: int) -> list:
    """The devices to build an n-device mesh from, in mesh order."""
    import jax

    if target == "tpu":
        return tpu_devices(hardware, n)
    if target == "gpu":
        return gpu_devices(hardware, n)
    if target == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise TargetError(
                f"target cpu needs {n} emulated devices but this process has {len(devices)}; compile through "
                f"codesign.compile.worker.compile_in_subprocess (sets XLA_FLAGS before JAX starts) or run the "
                f"CLI with --devices {n}"
            )
        return devices[:n]
    if target == "attached":
        devices = jax.devices()
        if len(devices) < n:
            raise TargetError(
                f"target attached: {n} devices needed, {len(devices)} attached ({devices[0].platform})"
            )
        return devices[:n]
    raise unknown_target(target)

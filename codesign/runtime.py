"""Process set-up that must happen before JAX initializes: platform choice and emulated devices.

Imports nothing from JAX. The CLI calls `configure` first; test processes do the same in
tests/conftest.py; worker subprocesses get it through their environment.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from codesign.config import ConfigError

_HOST_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\S*)")


class EnvironmentConflict(ConfigError):
    """The user's environment asks for something the command cannot honour (named with the fix)."""


def accelerator_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def nvidia_gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def host_device_flag() -> int | None:
    """The host device count the user's XLA_FLAGS asks for (the last occurrence wins, as in XLA)."""
    found = _HOST_COUNT_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
    if not found:
        return None
    try:
        return int(found[-1])
    except ValueError:
        raise EnvironmentConflict(f"XLA_FLAGS has --xla_force_host_platform_device_count={found[-1]!r}, not a "
                                  f"number; fix or remove it (codesign sets the host device count itself)") from None


def check_host_device_flag(devices: int, what: str) -> None:
    """Refuse to override a host device count the user set in XLA_FLAGS to a different number."""
    user = host_device_flag()
    if user is not None and user != devices:
        raise EnvironmentConflict(
            f"XLA_FLAGS asks for {user} host devices (--xla_force_host_platform_device_count={user}) but "
            f"{what} emulates {devices}; remove that flag from XLA_FLAGS (codesign sets the "
            f"count itself) or use --devices {user}")


def configure(cpu_devices: int | None = None, use_accelerator: bool = False) -> None:
    """Pick the platform and the emulated CPU device count for this process.

    `use_accelerator` (train/validate/calibrate) keeps a real GPU/TPU if one is attached; every
    other command compiles on the host CPU, so JAX is pinned to it and libtpu's host probing is
    silenced. `cpu_devices` sets XLA's host device count; a different count already in the user's
    XLA_FLAGS is an `EnvironmentConflict`, not silently replaced.
    """
    if "jax" in sys.modules:
        import jax

        if cpu_devices and jax.device_count() < cpu_devices and jax.default_backend() == "cpu":
            raise EnvironmentConflict(f"JAX already started with {jax.device_count()} devices; cannot emulate "
                               f"{cpu_devices}. Run codesign in a fresh process.")
        return
    silence_tpu_runtime_noise()
    on_host = not (use_accelerator and accelerator_present())
    if on_host:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if cpu_devices:
        if on_host:  # on an accelerator the host device count is moot
            check_host_device_flag(cpu_devices, "this run")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()


def silence_tpu_runtime_noise() -> None:
    """libtpu, importable on a host with no TPU, logs host-discovery errors when JAX starts.

    These variables make it skip the metadata-server and host queries. Left alone on a real TPU host.
    """
    if accelerator_present():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

"""Process set-up that must happen before JAX initializes: platform choice and emulated devices.

Imports nothing from JAX. The CLI calls `configure` first; test processes do the same in
tests/conftest.py; worker subprocesses get it through their environment.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Mapping, MutableMapping

from codesign.config import ConfigError

_HOST_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\S*)")


class EnvironmentConflict(ConfigError):
    """The user's environment asks for something the command cannot honour (named with the fix)."""


def accelerator_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def nvidia_gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def emulate_cpu_devices(env: MutableMapping[str, str], n: int) -> MutableMapping[str, str]:
    """The one place that asks JAX for `n` emulated CPU devices (`env`: os.environ, or a child's copy).

    Through `JAX_NUM_CPU_DEVICES`, JAX's own setting (it wins over XLA's host-count flag, which is
    removed so that only one number is ever in force).
    """
    flags = _HOST_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_NUM_CPU_DEVICES"] = str(int(n))
    return env


def host_device_requests(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Host device counts the user's environment (`env`, default os.environ) asks for, by where they
    were set: JAX_NUM_CPU_DEVICES and XLA_FLAGS' host-count flag (the last occurrence wins, as in XLA)."""
    env = os.environ if env is None else env
    out = {}
    raw = env.get("JAX_NUM_CPU_DEVICES")
    found = _HOST_COUNT_FLAG.findall(env.get("XLA_FLAGS", ""))
    for where, value in (
        ("JAX_NUM_CPU_DEVICES", raw),
        ("XLA_FLAGS --xla_force_host_platform_device_count", found[-1] if found else None),
    ):
        if not value:
            continue
        try:
            out[where] = int(value)
        except ValueError:
            raise EnvironmentConflict(
                f"{where}={value!r} is not a number; fix or unset it (codesign sets the "
                f"host device count itself)"
            ) from None
    return out


def check_host_device_flag(devices: int, what: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse to override a host device count the user set to a different number."""
    for where, user in host_device_requests(env).items():
        if user != devices:
            raise EnvironmentConflict(
                f"the environment asks for {user} host devices ({where}) but {what} emulates {devices}; remove "
                f"that setting (codesign sets the count itself) or use --devices {user}"
            )


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
            raise EnvironmentConflict(
                f"JAX already started with {jax.device_count()} devices; cannot emulate "
                f"{cpu_devices}. Run codesign in a fresh process."
            )
        return
    silence_tpu_runtime_noise()
    on_host = not (use_accelerator and accelerator_present())
    if on_host:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if cpu_devices:
        if on_host:  # on an accelerator the host device count is moot
            check_host_device_flag(cpu_devices, "this run")
        emulate_cpu_devices(os.environ, cpu_devices)


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

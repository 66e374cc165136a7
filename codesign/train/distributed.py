"""Multi-process (multi-host) start-up: `jax.distributed.initialize` before any other JAX call.

Settings come from flags (`--coordinator HOST:PORT --num-processes P --process-id I`) or, for each one
not given, from the environment (`CODESIGN_COORDINATOR`, `CODESIGN_NUM_PROCESSES`,
`CODESIGN_PROCESS_ID`). On CPU the processes exchange collectives through gloo (TCP), so N processes
on one machine (or several) form one mesh; on GPU/TPU the platform's own collectives are used.

This module imports JAX lazily: `settings_from` runs while the CLI parses arguments, before the
platform is chosen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

ENV_COORDINATOR = "CODESIGN_COORDINATOR"
ENV_NUM_PROCESSES = "CODESIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "CODESIGN_PROCESS_ID"


class DistributedError(ValueError):
    """Incomplete or inconsistent multi-process settings, or a failed start-up; one clear line."""


@dataclass(frozen=True)
class DistributedSettings:
    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int

    def to_json(self) -> dict:
        return {
            "coordinator": self.coordinator,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
        }


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what}={value!r} must be an integer") from None


def settings_from(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedSettings | None:
    """Merge flags with the CODESIGN_* environment; None when this is a single-process run.

    A run with num_processes == 1 is single-process (no coordination service is started).
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return None
    if num_processes is not None and num_processes == 1 and process_id in (None, 0):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(
            f"multi-process run needs --coordinator, --num-processes and --process-id (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {', '.join(missing)}"
        )
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
        raise DistributedError(f"--coordinator {coordinator!r} must be HOST:PORT (e.g. 10.0.0.1:8476)")
    if num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes})")
    return DistributedSettings(coordinator, int(num_processes), int(process_id))


def initialize(settings: DistributedSettings | None, *, timeout_s: int = 300) -> bool:
    """Start JAX's coordination service / client. Must run before JAX touches any device.

    Returns whether a multi-process runtime was started. On CPU selects gloo collectives first.
    """
    if settings is None:
        return False
    import jax

    from codesign import _compat

    gloo = _compat.cpu_gloo_available() and _compat.enable_cpu_collectives("gloo")
    if not gloo and os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        raise DistributedError(
            "this jaxlib has no gloo CPU collectives, so several CPU processes "
            "cannot form one mesh; run a single process with --devices N instead"
        )
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=int(timeout_s),
        )
    except RuntimeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(
            f"could not join the {settings.num_processes}-process run at {settings.coordinator} as "
            f"process {settings.process_id}: {msg}"
        ) from None
    return True

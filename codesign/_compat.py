"""Every JAX/Flax version shim lives here (jax 0.10 on the dev machine, 0.11+ on accelerators).

Nothing else in codesign may branch on a library version.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

try:  # jax >= 0.5
    from jax.sharding import AxisType
except ImportError:  # pragma: no cover - old jax
    AxisType = None  # type: ignore[assignment]


def make_mesh(devices: Sequence[Any], shape: Sequence[int], names: Sequence[str]) -> Mesh:
    """A Mesh with Auto axes (never Explicit: contracting-dim sharding must be legal; see DESIGN.md)."""
    arr = np.asarray(devices, dtype=object).reshape(tuple(shape))
    if AxisType is None:  # pragma: no cover
        return Mesh(arr, tuple(names))
    return Mesh(arr, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def use_mesh(mesh: Mesh):
    """Context manager that makes `mesh` the ambient mesh for tracing."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):  # pragma: no cover - jax 0.5/0.6
        return jax.sharding.use_mesh(mesh)
    return contextlib.nullcontext()  # pragma: no cover


def get_topology_desc(platform: str, **kwargs):
    """jax.experimental.topologies.get_topology_desc, with its import kept in one place."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform=platform, **kwargs)


def remat_policy(name: str):
    """jax.checkpoint policy for a codesign remat name (None means: do not rematerialize)."""
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_nobatch": cp.dots_with_no_batch_dims_saveable,
    }[name]


def silence_tpu_runtime_noise() -> None:
    """libtpu, when importable on a host with no TPU, logs host-discovery errors at JAX start-up.

    These variables make it skip the metadata-server and host queries. They change nothing when a
    TPU is attached to the host.
    """
    import glob

    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return  # a real TPU host: leave libtpu's discovery alone
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

"""Every JAX/Flax version shim lives here (jax 0.10 on the dev machine, 0.11+ on accelerators).

Nothing else in codesign may branch on a library version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

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


def cpu_gloo_available() -> bool:
    """Whether this jaxlib ships gloo CPU collectives (needed for multi-process runs on CPU)."""
    try:
        from jax._src.lib import _jax
    except ImportError:  # pragma: no cover - older jaxlib layout
        try:
            from jax._src.lib import xla_extension as _jax  # type: ignore[no-redef]
        except ImportError:
            return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def enable_cpu_collectives(implementation: str = "gloo") -> bool:
    """Select the cross-process CPU collectives before the CPU backend starts.

    Returns False when this jax has no `jax_cpu_collectives_implementation` option (then CPU
    multi-process collectives are unavailable).
    """
    if "jax_cpu_collectives_implementation" not in jax.config.values:
        return False
    jax.config.update("jax_cpu_collectives_implementation", implementation)
    return True


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """`shard_map` manual over every mesh axis, with replication checks off (the body's collectives
    are exactly the ones written). jax >= 0.7: `jax.shard_map(check_vma=)`; older:
    `jax.experimental.shard_map.shard_map(check_rep=)`."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _sm  # pragma: no cover - jax < 0.7

    return _sm(f, mesh, in_specs, out_specs, check_rep=False)  # pragma: no cover

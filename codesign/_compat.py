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


# Names the model layers give their intermediates (`jax.ad_checkpoint.checkpoint_name`), MaxText's
# names: the q/k/v projections (MLA: the latents and up-projections of each branch too), the attention
# context (input of the output projection), the output projection, the FFN's gate (wi_0), up (wi_1;
# wi when ungated) and down (wo) projections, dense and routed experts alike.
QUERY_PROJ, KEY_PROJ, VALUE_PROJ = "query_proj", "key_proj", "value_proj"
CONTEXT, OUT_PROJ = "context", "out_proj"
MLP_WI_0, MLP_WI_1, MLP_WI, MLP_WO = "mlpwi_0", "mlpwi_1", "mlpwi", "mlpwo"
_QKV = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ)
_MINIMAL = _QKV + (OUT_PROJ, MLP_WI_0, MLP_WI_1, MLP_WI, MLP_WO)
# The names each MaxText policy saves (its decoders.py get_remat_policy / minimal_policy).
SAVED_NAMES = {
    "minimal": _MINIMAL,
    "save_qkv_proj": _QKV,
    "save_dot_except_mlp": _QKV + (OUT_PROJ,),
    "save_dot_except_mlpwi": _QKV + (OUT_PROJ, MLP_WO),
    "offload": _MINIMAL,
}
# The input projections' names (what a block computes from its normed input).
PROJ_NAMES = _QKV + (MLP_WI_0, MLP_WI_1, MLP_WI)
# Policies under which the model checkpoints the attention core (QK^T, softmax, PV) by itself and keeps
# everything else but the gathered block inputs (backward all-gathers the sequence-sharded norm output
# again): Megatron-LM's selective recompute, with its sequence parallelism.
SELECTIVE_REMAT = frozenset({"selective"})


def remat_policy(name: str):
    """jax.checkpoint policy for a codesign remat name around each layer (None means: do not
    rematerialize the layer; `selective` rematerializes only the attention core, inside the layer)."""
    cp = jax.checkpoint_policies
    if name in ("none", "selective"):
        return None
    if name == "offload":  # MaxText's minimal_offloaded: the minimal set, parked in pinned host memory
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(SAVED_NAMES[name]),
            offload_src="device",
            offload_dst="pinned_host",
        )
    if name in SAVED_NAMES:
        return cp.save_only_these_names(*SAVED_NAMES[name])
    return {
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

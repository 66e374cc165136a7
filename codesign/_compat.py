"""Every JAX/Flax version shim lives here (jax 0.10 on the dev machine, 0.11+ on accelerators).

Nothing else in codesign may branch on a library version.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
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


def create_hybrid_device_mesh(ici_shape: Sequence[int], dcn_shape: Sequence[int], devices: Sequence[Any]):
    """jax.experimental.mesh_utils.create_hybrid_device_mesh over the devices' `slice_index`, splitting
    physical torus axes where a logical axis needs it (MaxText passes the same flag)."""
    from jax.experimental import mesh_utils

    return mesh_utils.create_hybrid_device_mesh(
        tuple(ici_shape), tuple(dcn_shape), list(devices), allow_split_physical_axes=True
    )


def param_logical_axes(variable) -> tuple | None:
    """The logical axis names an NNX param carries: `out_sharding` (Flax >= 0.12) or `sharding_names`."""
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names")


# Names the model layers give their intermediates (`jax.ad_checkpoint.checkpoint_name`), MaxText's
# names: the q/k/v projections (MLA: the latents and up-projections of each branch too), the attention
# context (input of the output projection), the output projection, the FFN's gate (wi_0), up (wi_1;
# wi when ungated) and down (wo) projections, dense and routed experts alike.
QUERY_PROJ, KEY_PROJ, VALUE_PROJ = "query_proj", "key_proj", "value_proj"
QKV_PROJ = "qkv_proj"  # the fused q/k/v projection's output (ModelConfig.fused_qkv), MaxText's name
CONTEXT, OUT_PROJ = "context", "out_proj"
MLP_WI_0, MLP_WI_1, MLP_WI, MLP_WO = "mlpwi_0", "mlpwi_1", "mlpwi", "mlpwo"
_QKV = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ)
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
# Policies under which backward reruns the layer's whole forward, the outputs XLA would drop as dead
# included (the FFN down-projection and its tensor reduction): PyTorch activation checkpointing, and so
# Megatron-LM's full recompute. The model keeps the rerun live (`models.transformer.rerun_whole_forward`).
WHOLE_LAYER_REMAT = frozenset({"full_layer"})


def remat_policy(name: str):
    """jax.checkpoint policy for a codesign remat name around each layer (None means: no jax.checkpoint
    around the layer; `selective` rematerializes only the attention core, inside the layer, and
    `full_layer` reruns the layer through its own custom VJP)."""
    cp = jax.checkpoint_policies
    if name in ("none", "selective") or name in WHOLE_LAYER_REMAT:
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


# ---------------------------------------------------------------------------------------------- XLA's answers
# What compiled.cost_analysis() / memory_analysis() return differs by backend and JAX version:
# * jax 0.10 (CPU, TPU): a dict with "flops", "bytes accessed" (with a space), per-operand
#   "bytes accessed0{}"/"bytes accessedout{}", "transcendentals", "utilization0{}"...; TPU adds
#   "optimal_seconds", sometimes negative (a sentinel);
# * some versions/backends: a list with one entry per executable;
# * the deviceless GPU compiler: None; a real GPU: negative "optimal_seconds".
# These numbers count a while-loop body once and FLOPs before optimization (jax-ml/jax#13956), so they
# are a cross-check only; codesign.compile.hlo is the primary count.


def first_executable(raw: Any) -> Any:
    """cost_analysis()/memory_analysis() of the (first) executable, whether the API returns one or a list."""
    if isinstance(raw, (list, tuple)):
        items = [d for d in raw if d]
        return items[0] if items else None
    return raw


_KEYS = {
    "flops": ("flops",),
    "bytes_accessed": ("bytes accessed", "bytes_accessed"),
    "transcendentals": ("transcendentals",),
    "optimal_seconds": ("optimal_seconds", "optimal seconds"),
}


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f >= 0 else None


def normalize_cost_analysis(raw: Any) -> dict[str, float | None] | None:
    """Flat ``{flops, bytes_accessed, transcendentals, optimal_seconds, utilization*...}`` or None.

    The four main keys are always present; a missing, negative or non-finite value is ``None``.
    ``utilization*`` keys are kept raw. Returns None when nothing usable came back (``None``, an
    empty dict/list, or only sentinels).
    """
    raw = first_executable(raw)
    if not isinstance(raw, Mapping):
        return None
    out: dict[str, float | None] = {}
    for key, names in _KEYS.items():
        out[key] = next((v for n in names if (v := _number(raw.get(n))) is not None), None)
    for k, v in raw.items():
        if isinstance(k, str) and k.startswith("utilization"):
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    if all(out[k] is None for k in _KEYS):
        return None
    return out


def compiled_hlo_text(compiled) -> tuple[str, str]:
    """(HLO text of the optimized module, the route that produced it).

    ``compiled.as_text()`` first. libtpu 0.0.52 fails it on large programs (a RET_CHECK on
    ``async-update``, seen on llama3.1-70b v5p-256); the runtime executable's ``HloModule`` is then
    printed directly, and last the module is rebuilt from its serialized HloModuleProto and printed.
    Raises the first error when every route fails."""
    try:
        return compiled.as_text(), "as_text"
    except Exception:  # try the other routes; re-raise this error if all fail
        routes = (
            ("hlo_modules", lambda m: m.to_string()),
            (
                "hlo_module_proto",
                lambda m: (
                    type(m).from_serialized_hlo_module_proto(m.as_serialized_hlo_module_proto()).to_string()
                ),
            ),
        )
        for route, show in routes:
            try:
                return show(compiled.runtime_executable().hlo_modules()[0]), route
            except Exception:  # noqa: BLE001, S112 - the next route may work
                continue
        raise


def orbax_tree_metadata(item_metadata: Any) -> Any:
    """The array tree of Orbax's StandardCheckpointHandler metadata: newer Orbax wraps it in a
    `TreeMetadata` (`.tree`), older versions return the tree itself."""
    return getattr(item_metadata, "tree", item_metadata)


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """`shard_map` manual over every mesh axis, with replication checks off (the body's collectives
    are exactly the ones written). jax >= 0.7: `jax.shard_map(check_vma=)`; older:
    `jax.experimental.shard_map.shard_map(check_rep=)`."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _sm  # pragma: no cover - jax < 0.7

    return _sm(f, mesh, in_specs, out_specs, check_rep=False)  # pragma: no cover


def _splash_modules():
    """The Pallas TPU splash attention kernel and its masks (jax.experimental.pallas.ops.tpu)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask

    return kernel, mask


def make_splash_mha(
    heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, head_shards: int, q_seq_shards: int
):
    """A causal splash attention kernel for `heads` query heads (GQA: K/V may have fewer heads), with
    square-ish blocks in every pass. BlockSizes' fields differ between jax versions (`q_layout`,
    fused-backward and `block_kv_dkv_compute` flags come and go), so only the fields this jax knows
    are passed; the fused backward kernel (dq and dkv in one pass) is used where it exists."""
    import dataclasses as dc
    import inspect

    kernel, mask = _splash_modules()
    want = {
        "block_q": block_q,
        "block_kv": block_kv,
        "block_kv_compute": block_kv,
        "block_q_dkv": block_q,
        "block_kv_dkv": block_kv,
        "block_kv_dkv_compute": block_kv,
        "block_q_dq": block_q,
        "block_kv_dq": block_kv,
        "use_fused_bwd_kernel": True,
    }
    names = {f.name for f in dc.fields(kernel.BlockSizes)}
    fused = "use_fused_bwd_kernel" in names
    if fused:  # the fused backward computes dq in the dkv pass: no separate dq blocks
        want.pop("block_q_dq"), want.pop("block_kv_dq")
    sizes = kernel.BlockSizes(**{k: v for k, v in want.items() if k in names})
    causal = mask.CausalMask((q_len, kv_len), shard_count=q_seq_shards)
    multi = mask.MultiHeadMask([causal] * heads)
    kwargs = {"block_sizes": sizes, "head_shards": head_shards, "q_seq_shards": q_seq_shards}
    accepted = inspect.signature(kernel.make_splash_mha).parameters
    return kernel.make_splash_mha(multi, **{k: v for k, v in kwargs.items() if k in accepted})


def splash_kernel_spec(kernel, mesh: Mesh, heads_axes, q_seq_axes):
    """The shard_map spec of a splash kernel's mask info: its head and query-block dims split like
    the query's heads and sequence."""
    from jax.sharding import NamedSharding, PartitionSpec

    return kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(heads_axes, q_seq_axes)))

"""What each remat policy keeps and what backward recomputes, in the closed form's terms.

A layer's weight matmuls are split into parts: `qkv` (the q/k/v projections; MLA: its latents and
up-projections too), `out` (attention output projection), `wi` (dense FFN gate/up), `wo` (dense FFN
down), and for MoE layers `router`, `routed_wi`, `routed_wo` (the experts' gate/up and down),
`shared_wi`, `shared_wo`. Backward NEEDS the output of every part except `wo`, `shared_wo` and the
combine einsum, whose outputs only enter the residual sum. A checkpointed layer recomputes each needed
part that its policy does not save; the named policies save the parts whose `checkpoint_name`
(`_compat.SAVED_NAMES`) they list. `full_layer` (`_compat.WHOLE_LAYER_REMAT`) reruns every part,
the unneeded ones too, as PyTorch activation checkpointing and Megatron-LM's full recompute do. The
attention core is costed apart (`core_recompute`).
"""

from __future__ import annotations

from codesign import _compat as C

PARTS = ("qkv", "out", "wi", "wo", "router", "routed_wi", "routed_wo", "shared_wi", "shared_wo")
NEEDED = frozenset({"qkv", "out", "wi", "router", "routed_wi", "routed_wo", "shared_wi"})
_BY_NAME = {
    C.QUERY_PROJ: ("qkv",),
    C.KEY_PROJ: ("qkv",),
    C.VALUE_PROJ: ("qkv",),
    C.QKV_PROJ: ("qkv",),  # the fused q/k/v projection (ModelConfig.fused_qkv)
    C.OUT_PROJ: ("out",),
    C.MLP_WI_0: ("wi", "routed_wi", "shared_wi"),
    C.MLP_WI_1: ("wi", "routed_wi", "shared_wi"),
    C.MLP_WI: ("wi", "shared_wi"),
    C.MLP_WO: ("wo", "routed_wo", "shared_wo"),
}
# The routed experts' einsums carry the expert dim on both sides (a batch dim): dots_nobatch skips them.
_WITH_BATCH_DIMS = frozenset({"routed_wi", "routed_wo"})


def layer_checkpointed(remat: str) -> bool:
    """Whether backward reruns the layer from its input (none and selective keep its activations)."""
    return remat not in ("none", "selective")


def saved_parts(remat: str) -> frozenset[str]:
    """Matmul outputs a layer keeps for backward (every part when the layer is not checkpointed)."""
    if not layer_checkpointed(remat) or remat == "dots":
        return frozenset(PARTS)
    if remat == "dots_nobatch":
        return frozenset(PARTS) - _WITH_BATCH_DIMS
    if remat == "full" or remat in C.WHOLE_LAYER_REMAT:
        return frozenset()
    return frozenset(p for n in C.SAVED_NAMES[remat] for p in _BY_NAME[n])


def recomputed_parts(remat: str) -> frozenset[str]:
    """Forward matmul parts backward runs again: the needed ones not saved, or all under full_layer."""
    if remat in C.WHOLE_LAYER_REMAT:
        return frozenset(PARTS)
    return NEEDED - saved_parts(remat)


def core_recompute(remat: str) -> tuple[bool, bool]:
    """(QK^T, PV) of the XLA attention core that backward runs again: both where the context is not
    kept (full, dots_nobatch, the named policies), QK^T alone under selective (the kept context makes
    PV dead), neither where the scores are kept (none, dots)."""
    if remat in ("none", "dots"):
        return False, False
    return True, remat != "selective"


def offloaded(remat: str) -> bool:
    """Saved parts go to pinned host memory, not HBM (MaxText's minimal_offloaded)."""
    return remat == "offload"


def regathered(remat: str, moe: bool) -> int:
    """Under sequence parallelism, how many of a layer's two gathered block inputs backward gathers
    again: both in a checkpointed layer (recomputed); under selective the ones the model replays
    (attention and dense FFN; an MoE block keeps its gathered input); none under remat none."""
    if layer_checkpointed(remat):
        return 2
    if remat == "selective":
        return 1 if moe else 2
    return 0

"""What dropout (`models.dropout`) adds to a layer of codesign's program, in the closed form's terms.

Each forward pass of a dropout site draws its mask: jax's partitionable threefry, fused into the
consumer kernels on an accelerator (vector work, no HBM traffic of its own). A site whose forward is
rerun in backward (the attention core under every policy that recomputes it, the hidden sites of a
checkpointed layer) draws its mask again rather than keeping it; XLA:CPU shows exactly that (one draw
per forward pass: 1.03 draws per score under remat none, 2.02 under full, tiny-dense). The hidden
sites of a layer that is not rerun keep a 1-byte mask for backward. The attention site writes the
dropped probabilities (the PV matmul's input) in each forward pass; XLA:CPU keeps no mask for it (its
temporaries grow by under 1 KB under remat none), so none is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from codesign.closed_form import remat as R
from codesign.models.attention import check_dropout_kernel

# Elementwise ops per mask element: jax.random.bernoulli (partitionable threefry2x32, 20 rounds) and
# the scaled select, as the HLO walk counts them in an XLA:CPU compile (206 per element for 2^16
# elements, with or without the per-row keys; tests/test_dropout.py recounts it).
RNG_OPS_PER_ELEMENT = 206
# XLA:CPU fuses little of the threefry: bytes its HLO moves per mask element drawn (the HLO walk on
# tiny-dense, data=8 and data=2,tensor=4, remat none and full: 222-247; the CPU stand-in only).
RNG_CPU_BYTES = 230
MASK_BYTES = 1  # a kept mask: bool


@dataclass(frozen=True)
class LayerDropout:
    """One layer's dropout per microbatch, per device."""

    drawn: float = 0.0  # mask elements drawn (each forward pass of each site)
    hbm_bytes: float = 0.0  # accelerator traffic: dropped probabilities written, kept masks
    saved_bytes: float = 0.0  # masks kept for backward


def layer_dropout(cfg, remat: str, sh, flash: bool) -> LayerDropout:
    """`sh`: the closed form's `Shape` (per-device rows b, query positions s, keys seq, t = b s)."""
    check_dropout_kernel(cfg.attention_dropout, flash)  # the program refuses it too
    drawn = hbm = saved = 0.0
    if cfg.attention_dropout:
        scores = sh.b * cfg.heads / sh.sizes["tensor"] * sh.s * sh.seq
        passes = 1 + any(R.core_recompute(remat))
        drawn += passes * scores
        hbm += passes * 2 * scores  # bf16 dropped probabilities, written for the PV matmul
    if cfg.hidden_dropout:
        elems = 2 * sh.t * sh.act.res  # the attention and FFN outputs (sequence-sharded under sp)
        rerun = R.layer_checkpointed(remat)
        drawn += (2 if rerun else 1) * elems
        if not rerun:
            saved += MASK_BYTES * elems
            hbm += 2 * MASK_BYTES * elems  # written forward, read backward
    return LayerDropout(drawn, hbm, saved)


def embedding_dropout(cfg, sh) -> LayerDropout:
    """The embedding output's dropout (first stage), never rerun: a kept mask."""
    if not cfg.hidden_dropout:
        return LayerDropout()
    elems = sh.t * sh.act.res
    return LayerDropout(elems, 2 * MASK_BYTES * elems, MASK_BYTES * elems)

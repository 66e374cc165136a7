"""`describe`: one row per param with its layout, in the scaling-book notation (`W[D_fsdp, F_tensor]`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.sharding import PartitionSpec

from codesign.sharding.params import path_str

# Scaling-book letters for the logical axes (D = d_model, F = FFN width, N/K = q/kv heads, ...).
LETTERS = {
    "vocab": "V",
    "embed": "D",
    "mlp": "F",
    "heads": "N",
    "kv_heads": "K",
    "head_dim": "H",
    "q_lora": "Q",
    "kv_lora": "R",
    "expert": "E",
    "layers": "L",
    "act_batch": "B",
    "act_seq": "T",
    "act_embed": "D",
    "act_mlp": "F",
    "act_heads": "N",
    "act_vocab": "V",
    "act_expert": "E",
}


@dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    spec: str
    bytes_per_device: int
    notation: str


def notation(logical, spec: PartitionSpec) -> str:
    parts = []
    for i, name in enumerate(logical):
        letter = LETTERS.get(name, "?") if name else "_"
        entry = spec[i] if i < len(spec) else None
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        parts.append(letter + "".join(f"_{a}" for a in axes))
    return f"W[{', '.join(parts)}]"


def describe(program) -> list[ParamRow]:
    """Rows for a `TrainProgram` (its abstract params, logical axes and resolved specs)."""
    sizes = program.mesh_sizes
    logical = dict(
        jax.tree_util.tree_flatten_with_path(program.logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    )
    specs = dict(
        jax.tree_util.tree_flatten_with_path(
            program.param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )[0]
    )
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(program.abstract_params)[0]:
        spec = specs[path]
        shards = math.prod(sizes[a] for e in spec if e for a in ((e,) if isinstance(e, str) else e))
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize // shards
        rows.append(
            ParamRow(
                path_str(path),
                tuple(leaf.shape),
                logical[path],
                str(spec),
                nbytes,
                notation(logical[path], spec),
            )
        )
    return rows

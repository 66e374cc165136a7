"""`Rules`: the ordered logical->mesh table, resolved strictly.

Precedence follows Flax: the first row naming a logical axis is the one used. Unlike Flax and
MaxText, resolution never replicates silently:

* strict mode raises `RulesError` naming the param path, its shape and the rule, for an unknown
  logical name, a mesh axis used twice in one array, or a dimension the mesh axes do not divide;
* non-strict mode (the planner, activation constraints) drops the offending mesh axis instead and
  records a `Dropped` row with the reason, so that the report can say what was replicated and why.

Mesh axes of size 1 are ignored: sharding over them is a no-op and only clutters the specs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from jax.sharding import PartitionSpec

from codesign.axes import ALL_AXES, MESH_AXES
from codesign.config import ConfigError
from codesign.sharding.strategy import Strategy
from codesign.userfiles import read_yaml

_RULES_SHAPE = (
    "a rules file is a YAML list of [logical_axis, mesh_axis | [mesh_axes] | null] rows, highest "
    "precedence first, e.g. [[embed, fsdp], [mlp, tensor], [head_dim, null]]"
)


class RulesError(ConfigError):
    """A logical->mesh resolution that cannot be honoured; the message names the param."""


@dataclass(frozen=True)
class Dropped:
    path: str
    logical: str
    mesh_axis: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.logical}->{self.mesh_axis} dropped ({self.reason})"


@dataclass(frozen=True)
class Rules:
    table: tuple[tuple[str, tuple[str, ...]], ...]
    # Logical axes a layout may leave replicated when their mesh axes do not divide them (the
    # enumerator rejects any other non-divisible dimension). Empty for a user's rules file: as written.
    may_replicate: frozenset[str] = frozenset()

    def __post_init__(self):
        for logical, mesh_axes in self.table:
            if logical not in ALL_AXES:
                raise RulesError(
                    f"rule {logical}->{mesh_axes}: unknown logical axis {logical!r}; "
                    f"known: {sorted(ALL_AXES)}"
                )
            for m in mesh_axes:
                if m not in MESH_AXES:
                    raise RulesError(
                        f"rule {logical}->{mesh_axes}: unknown mesh axis {m!r}; known: {MESH_AXES}"
                    )

    def lookup(self, logical: str) -> tuple[str, ...]:
        for name, mesh_axes in self.table:
            if name == logical:
                return mesh_axes
        if logical == "act_norm_seq":  # a table written before this name: the residual follows act_seq
            return self.lookup("act_seq")
        return ()

    def resolve(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int],
        mesh_sizes: Mapping[str, int],
        path: str = "<array>",
        strict: bool = True,
    ) -> tuple[PartitionSpec, tuple[Dropped, ...]]:
        """The PartitionSpec for one array, and (non-strict) the rules that had to be dropped."""
        if len(logical_axes) != len(shape):
            raise RulesError(f"{path}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
        used: set[str] = set()
        dropped: list[Dropped] = []
        entries = []
        for logical, dim in zip(logical_axes, shape):
            if logical is None:
                entries.append(None)
                continue
            if logical not in ALL_AXES:
                raise RulesError(
                    f"{path} shape {tuple(shape)}: unknown logical axis {logical!r}; "
                    f"known: {sorted(ALL_AXES)}"
                )
            chosen: list[str] = []
            for m in self.lookup(logical):
                size = mesh_sizes.get(m, 1)
                if size == 1:
                    continue
                problem = None
                if m in used:
                    problem = f"mesh axis {m!r} already shards another dimension of this array"
                elif dim % (math.prod(mesh_sizes[c] for c in chosen) * size):
                    problem = (
                        f"dimension {logical}={dim} is not divisible by "
                        f"{'*'.join(chosen + [m])}={math.prod(mesh_sizes[c] for c in chosen) * size}"
                    )
                if problem:
                    if strict:
                        raise RulesError(
                            f"{path} shape {tuple(shape)}, rule {logical}->{self.lookup(logical)}: "
                            f"{problem}. Change the strategy or the rule (or use non-strict mode)."
                        )
                    dropped.append(Dropped(path, logical, m, problem))
                    continue
                chosen.append(m)
                used.add(m)
            entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries), tuple(dropped)

    # -- I/O ---------------------------------------------------------------------------------
    def to_json(self) -> list[list]:
        return [[logical, list(m)] for logical, m in self.table]

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[tuple[str, str | Sequence[str] | None]], may_replicate: Iterable[str] = ()
    ) -> Rules:
        table = []
        for logical, mesh_axes in pairs:
            if mesh_axes is None:
                mesh_axes = ()
            elif isinstance(mesh_axes, str):
                mesh_axes = (mesh_axes,)
            table.append((logical, tuple(mesh_axes)))
        return cls(tuple(table), frozenset(may_replicate))

    @classmethod
    def from_file(cls, path: str) -> Rules:
        """A YAML list of [logical, mesh_axis | [mesh_axes] | null] rows, highest precedence first."""
        rows = read_yaml(path, "rules file", RulesError, _RULES_SHAPE)
        if not isinstance(rows, list) or not rows:
            raise RulesError(
                f"rules file {path!r} holds {type(rows).__name__ if rows else 'nothing'}; {_RULES_SHAPE}"
            )
        for i, r in enumerate(rows):
            ok = (
                isinstance(r, list)
                and len(r) == 2
                and isinstance(r[0], str)
                and (
                    r[1] is None
                    or isinstance(r[1], str)
                    or (isinstance(r[1], list) and all(isinstance(m, str) for m in r[1]))
                )
            )
            if not ok:
                raise RulesError(f"rules file {path!r} row {i + 1} is {r!r:.80}; {_RULES_SHAPE}")
        try:
            return cls.from_pairs((a, b) for a, b in rows)
        except RulesError as e:  # name the file: the user has to edit it
            raise RulesError(f"rules file {path!r}: {e}") from None


# KV heads replicate across tensor ranks when tensor > kv_heads (as Megatron does for GQA), and an
# embedding whose vocabulary the tensor axis does not divide is replicated rather than padded.
DEFAULT_MAY_REPLICATE = frozenset({"kv_heads", "vocab"})


def default_rules(strategy: Strategy | None = None) -> Rules:
    """Intent -> table. FSDP shards each weight's `embed` dim; tensor parallelism shards the
    Megatron dims (heads, mlp, vocab); the batch splits over every data-like axis; context
    parallelism (`sequence`) shards activations' positions; expert parallelism shards the expert dim.
    With `sp=1` the residual stream's positions (`act_norm_seq`) are sharded over `tensor` as well:
    XLA then turns each block's tensor all-reduce into a reduce-scatter into the sharded residual and
    an all-gather before the next block's matmuls (Megatron's sequence parallelism).
    """
    if strategy is not None and strategy.rules_file:
        return Rules.from_file(strategy.rules_file)
    sp = strategy is not None and strategy.sp
    return Rules.from_pairs(
        [
            ("act_batch", ("data", "fsdp", "expert")),
            ("act_seq", "sequence"),
            ("act_norm_seq", ("sequence", "tensor") if sp else "sequence"),
            ("act_embed", None),
            ("act_mlp", "tensor"),
            ("act_heads", "tensor"),
            ("act_vocab", "tensor"),
            ("act_expert", "expert"),
            ("vocab", "tensor"),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("head_dim", None),
            ("qkv", None),
            ("q_lora", None),
            ("kv_lora", None),
            ("expert", "expert"),
            ("layers", None),
        ],
        may_replicate=DEFAULT_MAY_REPLICATE,
    )

"""`Strategy`: one parallelism layout, parsed from and printed as the `--strategy` spec.

Spec grammar (INTERFACE.md): comma-separated key=value. Mesh axes `data, fsdp, tensor, sequence,
expert, pipeline` take positive sizes whose product is the device count (an axis left out has
size 1). Other keys: `remat=` one of `REMAT_POLICIES`, `microbatches=K`, `zero=0|1|2`, `order=a.b.c`
(mesh axis order onto the network, outermost first; default `pipeline.data.fsdp.expert.sequence.tensor`),
`sp=0|1` (sequence parallelism inside the tensor group) and `rules=FILE` (an explicit logical->mesh
table that replaces the defaults).

`zero` shards over the `data` axis (the pure replicas): 1 = optimizer state, 2 = optimizer state and the
gradient accumulator; params stay replicated over `data`. `fsdp` is ZeRO-3 and combines with either. In
an MoE model the `expert` axis is data-parallel for every param it does not shard (attention, norms,
shared expert, router, embedding), and ZeRO shards those params' state over it too (Megatron-LM's
distributed optimizer, DeepSeek-V3's ZeRO-1 over all 128 data-parallel ranks).
With data=1 a zero level is valid but does nothing (nothing to shard over; the program records it as a
dropped rule). It is not an error, because derived strategies (a compile's reduced data axis) may
bring data down to 1.

`sp=1` (Megatron's sequence parallelism, MaxText's norm-length -> tensor rule) shards the residual
stream and its norms over `tensor` along the sequence between the tensor-parallel blocks, so each
block's all-reduce becomes a reduce-scatter + all-gather. It is distinct from the `sequence` axis
(context parallelism). With tensor=1 there is no tensor group to shard over: `sp=1` is accepted and
dropped (as Megatron-LM does), so `data=8,sp=1` is the same strategy as `data=8`. With `rules=FILE`
the file alone decides the activation layout (map `act_norm_seq` there), so `sp=1` is refused.

`schedule=gpipe|1f1b|interleaved|dualpipe` and `stages_per_device=V` (alias `v=V`) describe the pipeline
(pipeline=p > 1): each device holds V stage chunks of L/(p*V) layers (Megatron's virtual pipeline stages).
`interleaved` is 1F1B with V > 1 (1f1b with V > 1 is normalized to it); gpipe with V > 1 is MaxText's
circular pipeline. DualPipe (DeepSeek-V3) runs two directions over the same p devices and needs V=1.
With pipeline=1 both are dropped (normalized to 1f1b, V=1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from codesign.axes import MESH_AXES

# Remat policies (what each saves: `_compat.remat_policy`). none/full/dots/dots_nobatch are codesign's
# own; minimal, save_qkv_proj, save_dot_except_mlp, save_dot_except_mlpwi are MaxText's names (and
# sets of saved projections); offload is MaxText's minimal_offloaded (the same set, kept in host
# memory); selective is Megatron-LM's selective recompute (only the attention core is recomputed);
# full_layer is Megatron-LM's full recompute (the whole layer forward again, which `full` is not: XLA
# drops the recomputed FFN down-projection, whose output backward does not need).
REMAT_POLICIES = (
    "none",
    "full",
    "full_layer",
    "dots",
    "dots_nobatch",
    "minimal",
    "save_qkv_proj",
    "save_dot_except_mlp",
    "save_dot_except_mlpwi",
    "offload",
    "selective",
)
BATCH_AXES = ("data", "fsdp", "expert")
_SORTED_AXES = sorted(MESH_AXES)  # what a mesh's axis names sort to (checked for ~10^6 candidates a plan)
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved", "dualpipe")


def batch_shards(sizes: dict[str, int]) -> int:
    """How many ways a mesh of these axis sizes splits the global batch."""
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


ZERO_LEVELS = (0, 1, 2)


class StrategyError(ValueError):
    """A malformed or impossible strategy; the message says which key and what is allowed."""


@dataclass(frozen=True)
class Strategy:
    # Mesh axis sizes in network order, outermost first; every axis of MESH_AXES appears once.
    mesh: tuple[tuple[str, int], ...]
    remat: str = "full"
    microbatches: int = 1
    rules_file: str | None = None
    zero: int = 0
    sp: bool = False  # sequence parallelism in the tensor group (normalized to False when tensor=1)
    schedule: str = "1f1b"  # pipeline schedule (normalized to 1f1b when pipeline=1)
    stages_per_device: int = 1  # virtual stage chunks per pipeline device (1 when pipeline=1)
    # Axes the planner swept but kept at size 1 are dropped from `spec` for readability.
    _order_given: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        names = [a for a, _ in self.mesh]
        if sorted(names) != _SORTED_AXES:
            raise StrategyError(f"mesh must name each of {MESH_AXES} once, got {names}")
        for a, n in self.mesh:
            if not isinstance(n, int) or n < 1:
                raise StrategyError(f"mesh axis {a}={n!r}: sizes must be positive integers")
        if self.remat not in REMAT_POLICIES:
            raise StrategyError(f"remat={self.remat!r}; use one of {', '.join(REMAT_POLICIES)}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise StrategyError(f"microbatches={self.microbatches!r} must be a positive integer")
        if self.zero not in ZERO_LEVELS or isinstance(self.zero, bool):
            raise StrategyError(
                f"zero={self.zero!r}; use 0 (off), 1 (optimizer state) or 2 (+ gradients) "
                "sharded over data; fsdp=N is ZeRO-3"
            )
        if self.sp and self.rules_file:
            raise StrategyError(
                "sp=1 with rules=FILE: the rules file decides the activation layout; map "
                "act_norm_seq to [sequence, tensor] in the file instead"
            )
        if self.sp and dict(self.mesh)["tensor"] == 1:
            object.__setattr__(self, "sp", False)  # no tensor group: sequence parallelism is a no-op
        if self.schedule not in PIPELINE_SCHEDULES:
            raise StrategyError(
                f"schedule={self.schedule!r}; use one of {', '.join(PIPELINE_SCHEDULES)} "
                "(interleaved is 1F1B with stages_per_device=V > 1)"
            )
        v = self.stages_per_device
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise StrategyError(
                f"stages_per_device={v!r} must be a positive integer (stage chunks per device)"
            )
        if self.schedule == "dualpipe" and v > 1:
            raise StrategyError(
                "schedule=dualpipe holds two chunks per device by design; use stages_per_device=1"
            )
        if dict(self.mesh)["pipeline"] == 1:  # no pipeline: nothing to schedule
            object.__setattr__(self, "schedule", "1f1b")
            object.__setattr__(self, "stages_per_device", 1)
        elif self.schedule == "interleaved" and v == 1:
            raise StrategyError("schedule=interleaved needs stages_per_device=V >= 2 (V=1 is plain 1f1b)")
        elif self.schedule == "1f1b" and v > 1:
            object.__setattr__(self, "schedule", "interleaved")

    @property
    def stage_chunks(self) -> int:
        """Pipeline stage chunks the layer stack is cut into: pipeline x virtual (x 2 for DualPipe's
        two directions, which hold mirrored copies, not more chunks)."""
        return self.size("pipeline") * self.stages_per_device

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def make(
        cls,
        sizes: dict[str, int] | None = None,
        *,
        remat: str = "full",
        microbatches: int = 1,
        order: tuple[str, ...] | None = None,
        rules_file: str | None = None,
        zero: int = 0,
        sp: bool = False,
        schedule: str = "1f1b",
        stages_per_device: int = 1,
    ) -> Strategy:
        sizes = dict(sizes or {})
        unknown = sorted(set(sizes) - set(MESH_AXES))
        if unknown:
            raise StrategyError(f"unknown mesh axes {unknown}; mesh axes are {', '.join(MESH_AXES)}")
        given = order is not None
        order = tuple(order) if order else MESH_AXES
        if sorted(order) != _SORTED_AXES:
            missing = [a for a in MESH_AXES if a not in order]
            order = tuple(order) + tuple(missing)
            if sorted(order) != sorted(MESH_AXES):
                raise StrategyError(f"order={'.'.join(order)} must list mesh axes from {MESH_AXES} once")
        mesh = tuple((a, int(sizes.get(a, 1))) for a in order)
        return cls(
            mesh=mesh,
            remat=remat,
            microbatches=microbatches,
            rules_file=rules_file,
            zero=zero,
            sp=bool(sp),
            schedule=schedule,
            stages_per_device=stages_per_device,
            _order_given=given and order != MESH_AXES,
        )

    @classmethod
    def parse(cls, spec: str) -> Strategy:
        sizes: dict[str, int] = {}
        kw: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise StrategyError(
                    f"strategy item {item!r} is not key=value (example: data=2,fsdp=4,remat=full)"
                )
            k, v = (s.strip() for s in item.split("=", 1))
            if k in MESH_AXES:
                try:
                    sizes[k] = int(v)
                except ValueError:
                    raise StrategyError(f"mesh axis {k}={v!r} must be an integer") from None
            elif k == "remat":
                kw["remat"] = v
            elif k == "microbatches":
                try:
                    kw["microbatches"] = int(v)
                except ValueError:
                    raise StrategyError(f"microbatches={v!r} must be an integer") from None
            elif k == "zero":
                try:
                    kw["zero"] = int(v)
                except ValueError:
                    raise StrategyError(f"zero={v!r} must be 0, 1 or 2") from None
            elif k == "order":
                kw["order"] = tuple(v.split("."))
            elif k == "rules":
                kw["rules_file"] = v
            elif k == "sp":
                if v not in ("0", "1"):
                    raise StrategyError(
                        f"sp={v!r}: use sp=1 (sequence parallelism in the tensor group) or sp=0"
                    )
                kw["sp"] = v == "1"
            elif k == "schedule":
                kw["schedule"] = v
            elif k in ("stages_per_device", "v"):
                try:
                    kw["stages_per_device"] = int(v)
                except ValueError:
                    raise StrategyError(f"{k}={v!r} must be an integer (stage chunks per device)") from None
            else:
                raise StrategyError(
                    f"unknown strategy key {k!r}; keys are {', '.join(MESH_AXES)}, remat, "
                    "microbatches, zero, order, rules, sp, schedule, stages_per_device (v)"
                )
        return cls.make(sizes, **kw)

    # -- views -------------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh)

    def size(self, axis: str) -> int:
        return self.sizes[axis]

    @property
    def n_devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.mesh)

    # The one definition of "batch-like": every other module asks the strategy.
    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes that split the global batch (the expert axis doubles as data outside MoE blocks)."""
        return BATCH_AXES

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes whose devices hold different tokens: the batch axes and `sequence` (context
        parallelism). A param not sharded over one of them has its gradient reduced over it."""
        return BATCH_AXES + ("sequence",)

    @property
    def batch_shards(self) -> int:
        return batch_shards(self.sizes)

    @property
    def spec(self) -> str:
        parts = [f"{a}={n}" for a, n in self.mesh if n > 1] or ["data=1"]
        parts.append(f"remat={self.remat}")
        if self.microbatches > 1:
            parts.append(f"microbatches={self.microbatches}")
        if self.zero:
            parts.append(f"zero={self.zero}")
        if self.sp:
            parts.append("sp=1")
        if self.schedule not in ("1f1b", "interleaved"):  # interleaved is implied by v > 1
            parts.append(f"schedule={self.schedule}")
        if self.stages_per_device > 1:
            parts.append(f"v={self.stages_per_device}")
        if self._order_given:
            parts.append("order=" + ".".join(self.order))
        if self.rules_file:
            parts.append(f"rules={self.rules_file}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.spec

    def replace(self, **kw) -> Strategy:
        sizes = kw.pop("sizes", self.sizes)
        order = kw.pop("order", self.order if self._order_given else None)
        base = {
            "remat": self.remat,
            "microbatches": self.microbatches,
            "rules_file": self.rules_file,
            "zero": self.zero,
            "sp": self.sp,
            "schedule": self.schedule,
            "stages_per_device": self.stages_per_device,
        }
        base.update(kw)
        return Strategy.make(sizes, order=order, **base)

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": {a: n for a, n in self.mesh if n > 1},
            "remat": self.remat,
            "microbatches": self.microbatches,
            "zero": self.zero,
            "sp": self.sp,
            "schedule": self.schedule,
            "stages_per_device": self.stages_per_device,
            "spec": self.spec,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Strategy:
        if "spec" in d:
            return cls.parse(d["spec"])
        return cls.make(
            d.get("mesh", {}),
            remat=d.get("remat", "full"),
            microbatches=d.get("microbatches", 1),
            zero=d.get("zero", 0),
            sp=bool(d.get("sp", False)),
            schedule=d.get("schedule", "1f1b"),
            stages_per_device=d.get("stages_per_device", 1),
        )

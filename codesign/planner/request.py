"""What `plan` is asked (`PlanRequest`; `plan` itself is in `entry.py`: the plan cache first, the
search only on a miss).

Imports nothing from JAX (neither do `entry` and `plan_cache`): a rerun of the same request is served
from the plan cache without starting JAX or the closed form, in about the time it takes to read it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from codesign.config import ModelConfig, Workload
from codesign.hardware.catalog import Hardware
from codesign.planner.constraints import Constraint
from codesign.sharding.strategy import PIPELINE_SCHEDULES

if TYPE_CHECKING:
    from codesign.report import CompileReport

REMATS = ("none", "full", "dots")  # scored for every layout (search.py says how the others are reached)


@dataclass
class PlanRequest:
    cfg: ModelConfig
    hardware: Hardware
    workload: Workload
    n_devices: int
    target: str = "auto"
    top_k: int = 4  # candidates that must be verified by a compile (when the target compiles)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 600.0
    constraints: tuple[Constraint, ...] = ()
    headroom: float = 0.0  # extra fraction of HBM to keep free, on top of the catalog's reserve
    exhaustive: bool = False
    max_compiles: int | None = None
    max_compile_devices: int | None = None
    remats: tuple[str, ...] = REMATS
    # None: REFINE_REMATS and SPS when `remats` is left at REMATS; a caller that narrows `remats` gets
    # exactly those policies, without sp, unless it names these too.
    refine_remats: tuple[str, ...] | None = None
    sps: tuple[bool, ...] | None = None
    zeros: tuple[int, ...] | None = None  # None: ZEROS when `remats` is left at REMATS
    # None: each layout's `microbatch_counts` (powers of two up to its per-replica batch, and that batch)
    microbatches: tuple[int, ...] | None = None
    schedules: tuple[str, ...] = PIPELINE_SCHEDULES  # tried on layouts with pipeline > 1
    axis_orders: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    executor: str = "local"  # the measuring loop's executor: "local" worker processes or "ray"
    # Reports from earlier plans of the same model/workload/target (a sweep over hardware knobs):
    # a strategy found here is re-costed under this request's hardware instead of recompiled.
    reuse: dict[str, CompileReport] | None = None
    progress: Callable[[str, int, int], None] | None = None  # (label, done, total)

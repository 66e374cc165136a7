"""The planner's entry point: a request planned before on the same code is read back from the plan cache
(before JAX is imported); anything else is searched (`search.search`) and stored."""

from __future__ import annotations

import math
import time

from codesign.config import ConfigError
from codesign.plan_file import Plan
from codesign.planner.request import PlanRequest


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def plan(req: PlanRequest) -> Plan:
    """The plan for `req`: read back from the plan cache when this request was planned before on the
    same code, else searched (`search.search`) and stored."""
    from codesign.compile.target_names import resolve_target
    from codesign.planner import plan_cache

    t0 = time.perf_counter()
    w = req.workload
    if req.n_devices > 1 and math.gcd(w.global_batch, req.n_devices) == 1:
        raise ConfigError(
            f"global batch {w.global_batch} shares no factor with {req.n_devices} devices, so no "
            f"data-parallel split exists; use a multiple of {_smallest_factor(req.n_devices)}"
        )
    target = resolve_target(req.target, req.hardware)
    key = plan_cache.plan_key(req, target)
    cached = plan_cache.load(req.cache_dir, key) if key else None
    if cached is not None:  # the same request on the same code: nothing to search again
        cached.search = {**cached.search, "wall_s": round(time.perf_counter() - t0, 2), "plan_cache": True}
        return cached
    from codesign.planner.search import search

    return search(req, target, key, t0)

"""One place that normalizes XLA's ``compiled.cost_analysis()`` across backends and JAX versions.

What comes back differs:

* jax 0.10 (CPU, TPU): a dict with ``"flops"``, ``"bytes accessed"`` (with a space), per-operand
  ``"bytes accessed0{}"``/``"bytes accessedout{}"``, ``"transcendentals"``, ``"utilization0{}"``...;
  TPU adds ``"optimal_seconds"``, sometimes negative (a sentinel);
* some versions/backends: a list with one such dict per executable;
* the deviceless GPU compiler: ``None``; a real GPU: negative ``optimal_seconds``.

These numbers count a while-loop body once and FLOPs before optimization (jax-ml/jax#13956), so
they are a cross-check only; :mod:`codesign.compile.hlo` is the primary count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
    if isinstance(raw, (list, tuple)):
        dicts = [d for d in raw if isinstance(d, Mapping) and d]
        raw = dicts[0] if dicts else None
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

"""How numbers are printed, in one place.

Memory sizes are binary (GiB = 2**30 bytes): HBM is sold in binary units (an "80 GB" H100 holds 80 GiB),
the catalog stores `hbm_gib`, and XLA's out-of-memory messages ("95.73G") are GiB. Rates stay decimal
(GB/s, TFLOP/s), as every datasheet and the scaling book give them.
"""

from __future__ import annotations

import math

GiB = 1 << 30
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_SI = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def _digits(v: float) -> str:
    """Three significant digits without switching to exponent notation: 1.23, 61.2, 512, 1000."""
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def fmt_bytes(n: float | None) -> str:
    """A memory size: `61.2 GiB`, `512 MiB`, `17 B`."""
    if n is None or not math.isfinite(n):
        return "-"
    for suffix, size in _BINARY:
        if abs(n) >= size:
            return f"{_digits(n / size)} {suffix}"
    return f"{n:.0f} B"


def fmt_si(x: float | None, unit: str = "") -> str:
    """A decimal quantity with an SI prefix: `989 TFLOP/s`, `4.8 TB/s`, `8.03 G` (parameters)."""
    if x is None or not math.isfinite(x):
        return "-"
    for prefix, size in _SI:
        if abs(x) >= size:
            return f"{x / size:.3g} {prefix}{unit}".strip()
    return f"{x:.3g} {unit}".strip()


def fmt_knob(v: object) -> str:
    """A sweep knob value as people write it on the command line: 25e9 -> `25G`, True -> `yes`."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) and math.isfinite(v) and abs(v) >= 1e3:
        for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(v) >= size:
                return f"{v / size:g}{suffix}"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)

"""JAX's `device.device_kind` -> the catalog's chip and system: the one table both the trainer (MFU peak)
and `calibrate` (the profile's base system) read.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CatalogMatch:
    chip: str  # catalog chip: its peak FLOP/s is the MFU denominator
    system: str  # catalog system built from that chip: the base of a calibrated profile


# Lower-case substrings of device_kind, most specific first ("gb200" before "b200", "tpu v5 lite" before
# "tpu v5"). JAX reports e.g. "NVIDIA H100 80GB HBM3", "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p"
# (v5p), "TPU v6 lite" (v6e), "cpu".
_TABLE = (
    ("gb200", CatalogMatch("gb200-gpu", "gb200-nvl72")),
    ("b200", CatalogMatch("b200-sxm", "b200")),
    ("h200", CatalogMatch("h200-sxm", "h200")),
    ("h800", CatalogMatch("h800-sxm", "h800")),
    ("h100", CatalogMatch("h100-sxm", "h100")),
    ("a100", CatalogMatch("a100-sxm-80g", "a100")),
    ("tpu v6 lite", CatalogMatch("tpu-v6e-chip", "tpu-v6e")),
    ("tpu v6e", CatalogMatch("tpu-v6e-chip", "tpu-v6e")),
    ("tpu v5 lite", CatalogMatch("tpu-v5e-chip", "tpu-v5e")),
    ("tpu v5e", CatalogMatch("tpu-v5e-chip", "tpu-v5e")),
    ("tpu v5p", CatalogMatch("tpu-v5p-chip", "tpu-v5p")),
    ("tpu v5", CatalogMatch("tpu-v5p-chip", "tpu-v5p")),
    ("tpu v4", CatalogMatch("tpu-v4-chip", "tpu-v4")),
    ("cpu", CatalogMatch("cpu", "cpu")),
)
# A chip we do not know still gets a profile of its platform's most common system (calibrate replaces
# its efficiencies with measurements); its MFU stays unknown (no peak is guessed).
_PLATFORM_DEFAULT_SYSTEM = {"gpu": "h100", "tpu": "tpu-v5p"}


def catalog_match(device_kind: str) -> CatalogMatch | None:
    """The catalog chip and system for a device kind; None when the kind is not in the catalog."""
    k = device_kind.lower()
    for needle, match in _TABLE:
        if needle in k:
            return match
    return None


def closest_system(device_kind: str, platform: str) -> str:
    """The catalog system for a device kind, else the platform's default system (else `cpu`)."""
    match = catalog_match(device_kind)
    if match is not None:
        return match.system
    return _PLATFORM_DEFAULT_SYSTEM.get(platform, "cpu")

"""Device kind -> catalog chip and system: one table for the trainer's MFU peak and calibrate's profile."""

import pytest

from codesign.calibrate import closest_system
from codesign.hardware import hardware_names
from codesign.hardware.device_kind import _TABLE, catalog_match


@pytest.mark.parametrize(
    ("kind", "chip", "system"),
    [
        ("NVIDIA H200", "h200-sxm", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm", "h100"),
        ("NVIDIA H800", "h800-sxm", "h800"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm-80g", "a100"),
        ("NVIDIA B200", "b200-sxm", "b200"),
        ("NVIDIA GB200", "gb200-gpu", "gb200-nvl72"),  # not B200: the more specific name wins
        ("TPU v4", "tpu-v4-chip", "tpu-v4"),
        ("TPU v5 lite", "tpu-v5e-chip", "tpu-v5e"),  # v5e, not v5p
        ("TPU v5", "tpu-v5p-chip", "tpu-v5p"),
        ("TPU v5p", "tpu-v5p-chip", "tpu-v5p"),
        ("TPU v6 lite", "tpu-v6e-chip", "tpu-v6e"),
        ("cpu", "cpu", "cpu"),
    ],
)
def test_catalog_match(kind, chip, system):
    m = catalog_match(kind)
    assert (m.chip, m.system) == (chip, system)
    assert closest_system(kind, "whatever") == system


def test_unknown_kind():
    assert catalog_match("Radeon Instinct MI300X") is None  # the trainer then reports no MFU
    assert closest_system("Radeon Instinct MI300X", "gpu") == "h100"  # calibrate still needs a base system
    assert closest_system("TPU v9", "tpu") == "tpu-v5p"
    assert closest_system("Some NPU", "npu") == "cpu"


def test_every_entry_is_in_the_catalog():
    names = set(hardware_names())
    assert {m.chip for _, m in _TABLE} | {m.system for _, m in _TABLE} <= names

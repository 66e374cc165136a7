"""The hardware catalog: chips, network levels, efficiencies, and TPU slice topologies."""

from codesign.hardware.catalog import (
    Chip,
    Efficiency,
    Hardware,
    HardwareError,
    NetworkLevel,
    hardware_names,
    list_hardware,
    load_hardware,
)
from codesign.hardware.topology import (
    SliceTopology,
    TopologyError,
    tpu_slice,
    tpu_topology_name,
    valid_slice_sizes,
)

__all__ = [
    "Chip",
    "Efficiency",
    "Hardware",
    "HardwareError",
    "NetworkLevel",
    "SliceTopology",
    "TopologyError",
    "hardware_names",
    "list_hardware",
    "load_hardware",
    "tpu_slice",
    "tpu_topology_name",
    "valid_slice_sizes",
]

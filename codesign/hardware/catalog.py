"""Hardware as plain data: chips, network levels, achievable efficiencies, and the catalog that names them.

The numbers live in `codesign/data/hardware_catalog.yaml`, each with its source. `load_hardware` takes a
catalog name or a YAML/JSON profile (the shape `Hardware.to_json()` writes, which `codesign calibrate`
produces) and sizes the network for a device count: TPU slices get their torus shape from
`codesign.hardware.topology`; GPU systems fill the scale-up domain (8 per node, 72 per NVL72) and let
the scale-out level span the rest.

Units: FLOP/s, bytes, bytes/s, seconds. Bandwidth conventions are in the YAML header and `NetworkLevel`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from codesign.config import ConfigError
from codesign.hardware.topology import TopologyError, split_slices
from codesign.userfiles import read_yaml

GiB = 1 << 30
_KINDS = ("chip", "system")
_PLATFORMS = ("gpu", "tpu", "cpu")
_TOPOLOGIES = ("switch", "torus")


class HardwareError(ConfigError):
    """An unknown hardware name, a malformed profile, or a device count the hardware cannot have."""


_PROFILE_SHAPE = (
    "a hardware profile is a YAML mapping of Hardware fields, as `codesign calibrate --out FILE` "
    "writes it (or use a catalog name from `codesign hardware`)"
)


def _number(owner: object, field_name: str, kind: type, lo: float | None = None, lo_open: bool = False):
    """`owner.field_name` as a finite int/float (a profile may hold strings, nulls, NaN); set in place."""
    v = getattr(owner, field_name)
    label = f"{type(owner).__name__} {getattr(owner, 'name', '')!r}".replace(" ''", "")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HardwareError(f"{label}: {field_name} must be a finite number, got {v!r}")
    if kind is int and v != int(v):
        raise HardwareError(f"{label}: {field_name} must be a whole number, got {v!r}")
    v = kind(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise HardwareError(f"{label}: {field_name} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    object.__setattr__(owner, field_name, v)


class FrozenMap(dict):
    """A read-only, hashable dict, so frozen dataclasses holding one stay hashable (and JSON-dumpable)."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _ro(self, *a, **k):
        raise TypeError("FrozenMap is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]


def _fm(d: Mapping | None) -> FrozenMap:
    return d if isinstance(d, FrozenMap) else FrozenMap(d or {})


@dataclass(frozen=True)
class NetworkLevel:
    """One level of the network, innermost (fastest) first in `Hardware.levels`.

    bytes_per_s is per device, per direction. For a "switch" level (NVLink/NVSwitch, InfiniBand, DCN)
    it is what one device can send while it receives as much. For a "torus" level (TPU ICI) it is ONE
    link, one way; a ring on a dim with wraparound drives both directions (`ring_bytes_per_s`).
    """

    name: str
    group_size: int  # devices sharing this level in this system (0 = unspecified)
    bytes_per_s: float
    latency_s: float  # alpha: per ring step (switch) or per hop (torus)
    topology: str = "switch"
    torus_dims: tuple[int, ...] = ()  # ICI slice dims in libtpu (x, y, z) order
    wraps: tuple[bool, ...] = ()  # per torus dim: has a wraparound link
    max_group_size: int = 0  # the most devices the level can hold (8 per DGX node); 0 = unbounded
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not isinstance(self.source, str):
            raise HardwareError(f"level {self.name!r}: name and source must be strings")
        if self.topology not in _TOPOLOGIES:
            raise HardwareError(f"level {self.name!r}: topology must be one of {_TOPOLOGIES}")
        _number(self, "bytes_per_s", float, 0, lo_open=True)
        _number(self, "latency_s", float, 0)
        _number(self, "group_size", int, 0)
        _number(self, "max_group_size", int, 0)
        if not isinstance(self.torus_dims, (list, tuple)) or not isinstance(self.wraps, (list, tuple)):
            raise HardwareError(f"level {self.name!r}: torus_dims and wraps must be lists")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.torus_dims):
            raise HardwareError(
                f"level {self.name!r}: torus_dims must be positive integers, got {self.torus_dims}"
            )
        object.__setattr__(self, "torus_dims", tuple(int(d) for d in self.torus_dims))
        object.__setattr__(self, "wraps", tuple(bool(w) for w in self.wraps))
        if len(self.wraps) != len(self.torus_dims):
            raise HardwareError(f"level {self.name!r}: wraps needs one flag per torus dim")

    def ring_bytes_per_s(self, wraps: bool = True) -> float:
        """Per-device bandwidth of a ring on this level: the switch bandwidth, or on a torus dim both
        directions of its link when the dim wraps (the scaling book's bidirectional W_ici)."""
        if self.topology == "switch":
            return self.bytes_per_s
        return self.bytes_per_s * (2.0 if wraps else 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group_size": self.group_size,
            "bytes_per_s": self.bytes_per_s,
            "latency_s": self.latency_s,
            "topology": self.topology,
            "torus_dims": list(self.torus_dims),
            "wraps": list(self.wraps),
            "max_group_size": self.max_group_size,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NetworkLevel:
        return cls(**_known(cls, d, "NetworkLevel"))


@dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "gpu" | "tpu" | "cpu"
    peak_flops: Mapping[str, float]  # dtype -> dense FLOP/s ("bf16", "fp8", "int8", "fp32", "tf32")
    hbm_bytes: int
    hbm_bytes_per_s: float
    sources: Mapping[str, str] = field(default_factory=FrozenMap)  # field -> where the number comes from

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise HardwareError(f"chip name must be a string, got {self.name!r}")
        if self.platform not in _PLATFORMS:
            raise HardwareError(f"chip {self.name!r}: platform must be one of {_PLATFORMS}")
        if not isinstance(self.peak_flops, Mapping) or not self.peak_flops:
            raise HardwareError(
                f"chip {self.name!r}: peak_flops must map dtype names to FLOP/s, e.g. {{bf16: 9.89e14}}"
            )
        for k, v in self.peak_flops.items():
            if (
                not isinstance(k, str)
                or isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise HardwareError(
                    f"chip {self.name!r}: peak_flops {k!r}: {v!r} is not a positive finite number"
                )
        object.__setattr__(self, "peak_flops", _fm({k: float(v) for k, v in self.peak_flops.items()}))
        _number(self, "hbm_bytes", int, 0, lo_open=True)
        _number(self, "hbm_bytes_per_s", float, 0, lo_open=True)
        object.__setattr__(self, "sources", _sources(self.sources, f"chip {self.name!r}"))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": self.platform,
            "peak_flops": dict(self.peak_flops),
            "hbm_bytes": self.hbm_bytes,
            "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "sources": dict(self.sources),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Chip:
        return cls(**_known(cls, d, "Chip"))


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of peak. matmul: dtype -> ((n, fraction), ...) for n x n x n matmuls,
    ascending n, interpolated in log2(n) and clamped at the ends; dtypes without a table use bf16's.
    sustained: matmul throughput when the chip is kept busy for a second or more, relative to the
    table's short runs at the same size (power-limited clocks drop under sustained load); it scales
    every matmul fraction. 1.0 = not measured."""

    matmul: Mapping[str, tuple[tuple[int, float], ...]]
    hbm: float
    collective: float
    source: str = ""
    sustained: float = 1.0

    def __post_init__(self):
        if not isinstance(self.matmul, Mapping):
            raise HardwareError("Efficiency.matmul must map dtype names to [[n, fraction], ...] tables")
        table = {k: tuple(sorted(_matmul_point(k, p) for p in pts)) for k, pts in self.matmul.items()}
        if "bf16" not in table or any(not pts for pts in table.values()):
            raise HardwareError("Efficiency.matmul needs a non-empty 'bf16' table")
        object.__setattr__(self, "matmul", _fm(table))
        for name in ("hbm", "collective", "sustained"):
            _number(self, name, float, 0, lo_open=True)
        if not isinstance(self.source, str):
            raise HardwareError(f"Efficiency.source must be a string, got {self.source!r}")
        if not 0 < self.sustained <= 1:
            raise HardwareError(f"Efficiency.sustained must be in (0, 1], got {self.sustained}")

    def matmul_fraction(self, dtype: str = "bf16", n: float = 8192) -> float:
        pts = self.matmul.get(dtype) or self.matmul["bf16"]
        return self.sustained * self._interpolate(pts, n)

    @staticmethod
    def _interpolate(pts, n: float) -> float:
        if n <= pts[0][0]:
            return pts[0][1]
        for (n0, f0), (n1, f1) in itertools.pairwise(pts):
            if n <= n1:
                t = (math.log2(n) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
                return f0 + t * (f1 - f0)
        return pts[-1][1]

    def to_json(self) -> dict[str, Any]:
        return {
            "matmul": {k: [list(p) for p in v] for k, v in self.matmul.items()},
            "hbm": self.hbm,
            "collective": self.collective,
            "source": self.source,
            "sustained": self.sustained,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Efficiency:
        return cls(**_known(cls, d, "Efficiency"))


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # "chip" | "system"
    chip: Chip
    efficiency: Efficiency
    devices: int = 0  # 0 = unspecified
    levels: tuple[NetworkLevel, ...] = ()  # innermost (fastest) first
    sources: Mapping[str, str] = field(default_factory=FrozenMap)
    tpu_generation: str | None = None  # "v4" | "v5e" | "v5p" | "v6e"
    memory_reserve_bytes: int = 0  # kept free for the runtime; see the YAML `reserves` section
    description: str = ""
    # TPU multi-slice (`--slices K`, `slices:` in a profile): K equal ICI slices joined over the DCN
    # level. 0 = automatic: one slice when the device count fits one, else the fewest equal slices.
    slices: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise HardwareError(f"hardware name and description must be strings, got {self.name!r}")
        if self.kind not in _KINDS:
            raise HardwareError(f"hardware {self.name!r}: kind must be one of {_KINDS}")
        if self.tpu_generation is not None and not isinstance(self.tpu_generation, str):
            raise HardwareError(f"hardware {self.name!r}: tpu_generation must be a string such as 'v5p'")
        _number(self, "devices", int, 0)
        _number(self, "memory_reserve_bytes", int, 0)
        _number(self, "slices", int, 0)
        if self.slices > 1 and not self._sliced():
            raise HardwareError(
                f"slices={self.slices}: multi-slice is for TPU systems (ICI slices joined over DCN); "
                f"{self.name!r} is {self.chip.platform} hardware whose network levels follow from the "
                f"device count alone; drop the slice count"
            )
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "sources", _sources(self.sources, f"hardware {self.name!r}"))

    def _sliced(self) -> bool:
        """A TPU system whose innermost level is an ICI torus (the level a slice is made of)."""
        return bool(self.tpu_generation and self.levels and self.levels[0].topology == "torus")

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def slice_count(self) -> int:
        """ICI slices the sized system has (1 for GPUs, CPUs and unsized hardware)."""
        if not self._sliced() or not self.devices or not self.levels[0].group_size:
            return 1
        return self.devices // self.levels[0].group_size

    @property
    def peak_flops(self) -> Mapping[str, float]:
        return self.chip.peak_flops

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    @property
    def memory_capacity_bytes(self) -> int:
        """HBM a program may use per device: capacity minus the runtime reserve."""
        return self.chip.hbm_bytes - self.memory_reserve_bytes

    def level(self, name_or_index: str | int) -> NetworkLevel:
        if isinstance(name_or_index, int):
            return self.levels[name_or_index]
        for lv in self.levels:
            if lv.name == name_or_index:
                return lv
        raise HardwareError(
            f"{self.name} has no network level {name_or_index!r}; levels: {[lv.name for lv in self.levels]}"
        )

    def critical_intensity(self, dtype: str = "bf16", level: str | int = 0) -> float:
        """Peak FLOP/s over a level's ring bandwidth (FLOPs per byte moved): a collective on that level
        hides behind compute only above this intensity. On TPU ICI this uses the bidirectional W_ici,
        as the scaling book does (v5p: 4.59e14 / 1.8e11 = 2550)."""
        if dtype not in self.peak_flops:
            raise HardwareError(f"{self.name} has no {dtype} peak; it has {sorted(self.peak_flops)}")
        return self.peak_flops[dtype] / self.level(level).ring_bytes_per_s(wraps=True)

    def with_devices(self, devices: int) -> Hardware:
        """The same hardware sized for `devices`: group sizes per level and, on TPU, the slice shape."""
        if devices < 0:
            raise HardwareError(f"devices must be >= 0, got {devices}")
        if self.kind == "chip" and devices > 1:
            raise HardwareError(
                f"{self.name!r} is a single chip with no network; use a system "
                f"(e.g. one of {[h.name for h in list_hardware() if h.kind == 'system']})"
            )
        if self._sliced():
            levels = _tpu_levels(self, devices)
        else:
            levels = tuple(dataclasses.replace(lv, group_size=_group(lv, devices)) for lv in self.levels)
        return dataclasses.replace(self, devices=devices, levels=levels)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "platform": self.platform,
            "devices": self.devices,
            "peak_flops": dict(self.peak_flops),
            "hbm_bytes": self.hbm_bytes,
            "hbm_bytes_per_s": self.chip.hbm_bytes_per_s,
            "memory_reserve_bytes": self.memory_reserve_bytes,
            "levels": [lv.to_json() for lv in self.levels],
            "sources": dict(self.sources),
            "tpu_generation": self.tpu_generation,
            "description": self.description,
            "slices": self.slices,
            "chip": self.chip.to_json(),
            "efficiency": self.efficiency.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Hardware:
        """Inverse of to_json. A profile may give the chip's fields at top level instead of `chip`."""
        try:
            if "chip" in d:
                chip = Chip.from_json(d["chip"])
            else:
                chip = Chip(
                    name=d["name"],
                    platform=d["platform"],
                    peak_flops=d["peak_flops"],
                    hbm_bytes=int(d["hbm_bytes"]),
                    hbm_bytes_per_s=float(d["hbm_bytes_per_s"]),
                    sources=d.get("sources", {}),
                )
            eff = d.get("efficiency")
            efficiency = Efficiency.from_json(eff) if eff else _efficiency(_catalog(), _default_eff(chip))
            return cls(
                name=d["name"],
                kind=d.get("kind", "system"),
                chip=chip,
                efficiency=efficiency,
                devices=int(d.get("devices", 0)),
                levels=tuple(NetworkLevel.from_json(lv) for lv in d.get("levels", ())),
                sources=d.get("sources", {}),
                tpu_generation=d.get("tpu_generation"),
                memory_reserve_bytes=int(d.get("memory_reserve_bytes", 0)),
                description=d.get("description", ""),
                slices=d.get("slices", 0),
            )
        except HardwareError:
            raise
        except KeyError as e:
            raise HardwareError(f"hardware profile is missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            # A field of the wrong shape (a list where a mapping belongs, a string where a number does).
            raise HardwareError(f"malformed hardware profile: {' '.join(str(e).split())}") from None


# ---------------------------------------------------------------------------------------------- helpers


def _known(cls, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise HardwareError(f"{what} must be a mapping of its fields, got {d!r:.60}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise HardwareError(f"unknown {what} fields {unknown}; known fields: {sorted(names)}")
    return dict(d)


def _sources(d: Any, what: str) -> FrozenMap:
    if not isinstance(d, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise HardwareError(f"{what}: sources must map field names to strings (where each number comes from)")
    return _fm(d)


def _matmul_point(dtype: Any, p: Any) -> tuple[int, float]:
    """One [n, fraction] row of an efficiency table."""
    ok = (
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in p)
    )
    if not ok or p[0] < 1 or p[1] <= 0:
        raise HardwareError(f"Efficiency.matmul[{dtype!r}]: row {p!r} must be [n >= 1, fraction of peak > 0]")
    return int(p[0]), float(p[1])


def _group(level: NetworkLevel, devices: int) -> int:
    if devices == 0:
        return level.max_group_size
    return min(devices, level.max_group_size) if level.max_group_size else devices


def _tpu_levels(hw: Hardware, devices: int) -> tuple[NetworkLevel, ...]:
    ici, rest = hw.levels[0], hw.levels[1:]
    if devices == 0:
        return (dataclasses.replace(ici, group_size=0, torus_dims=(), wraps=()),) + tuple(
            dataclasses.replace(lv, group_size=0) for lv in rest
        )
    try:
        topo, n_slices = split_slices(hw.tpu_generation, devices, hw.slices)
    except TopologyError as e:
        raise HardwareError(f"{hw.name} with {devices} chips: {e}") from None
    if n_slices > 1 and not rest:
        raise HardwareError(
            f"{hw.name}: {devices} chips in {n_slices} slices but the profile has no "
            f"level between slices (add a 'dcn' level)"
        )
    ici = dataclasses.replace(ici, group_size=topo.n_chips, torus_dims=topo.dims, wraps=topo.wraps)
    return (ici,) + tuple(dataclasses.replace(lv, group_size=devices) for lv in rest)


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, Any]:
    text = resources.files("codesign").joinpath("data/hardware_catalog.yaml").read_text()
    return yaml.safe_load(text)


def _default_eff(chip: Chip) -> str:
    return {"gpu": "gpu-assumed", "tpu": "tpu-assumed"}.get(chip.platform, "cpu-nominal")


def _efficiency(cat: dict[str, Any], key: str) -> Efficiency:
    e = cat["efficiency"][key]
    return Efficiency(
        matmul=e["matmul"],
        hbm=float(e["hbm"]),
        collective=float(e["collective"]),
        source=e["source"],
        sustained=float(e.get("sustained", 1.0)),
    )


def _chip(cat: dict[str, Any], name: str) -> Chip:
    c = cat["chips"][name]
    sources = {"peak_flops": c["source"], "hbm_bytes": c["source"], "hbm_bytes_per_s": c["source"]}
    if "fp32_source" in c:
        sources["peak_flops.fp32"] = c["fp32_source"]
    return Chip(
        name=name,
        platform=c["platform"],
        peak_flops=c["peak_flops"],
        hbm_bytes=round(float(c["hbm_gib"]) * GiB),
        hbm_bytes_per_s=float(c["hbm_bytes_per_s"]),
        sources=sources,
    )


def _reserve(cat: dict[str, Any], chip: Chip, generation: str | None) -> tuple[int, str]:
    r = cat["reserves"]
    if chip.platform == "gpu":
        return int(chip.hbm_bytes * float(r["gpu_fraction"])), r["gpu_source"]
    if chip.platform == "tpu" and generation in r["tpu_available_gib"]:
        available = round(float(r["tpu_available_gib"][generation]) * GiB)
        return max(chip.hbm_bytes - available, 0), r["tpu_source"]
    return 0, "none: nominal hardware"


def _generation_of(chip_name: str) -> str | None:
    for g in ("v4", "v5e", "v5p", "v6e"):
        if chip_name == f"tpu-{g}-chip":
            return g
    return None


@functools.cache
def _build(name: str) -> Hardware:
    cat = _catalog()
    if name in cat["systems"]:
        s = cat["systems"][name]
        chip, gen = _chip(cat, s["chip"]), s.get("tpu_generation")
        levels = []
        for lv in s["levels"]:
            lv = dict(lv)
            src = lv.pop("source") + (f"; {lv.pop('latency_source')}" if "latency_source" in lv else "")
            levels.append(NetworkLevel(group_size=0, source=src, **lv))
        eff, kind, desc = _efficiency(cat, s["efficiency"]), "system", s.get("description", "")
    else:
        chip, gen = _chip(cat, name), _generation_of(name)
        levels, kind = [], "chip"
        eff = _efficiency(
            cat, "hopper-probe" if name in ("h100-sxm", "h200-sxm", "h800-sxm") else _default_eff(chip)
        )
        desc = f"one {name} chip (no network)"
    reserve, reserve_src = _reserve(cat, chip, gen)
    sources = dict(chip.sources, efficiency=eff.source, memory_reserve_bytes=reserve_src)
    sources.update({f"levels.{lv.name}": lv.source for lv in levels})
    hw = Hardware(
        name=name,
        kind=kind,
        chip=chip,
        efficiency=eff,
        levels=tuple(levels),
        sources=sources,
        tpu_generation=gen,
        memory_reserve_bytes=reserve,
        description=desc,
    )
    return hw.with_devices(0)


def hardware_names() -> list[str]:
    """Catalog names: systems first, then chips usable alone (a chip named like a system is hidden)."""
    cat = _catalog()
    return list(cat["systems"]) + [c for c in cat["chips"] if c not in cat["systems"]]


def list_hardware() -> list[Hardware]:
    return [_build(n) for n in hardware_names()]


def load_hardware(
    name_or_path: str | os.PathLike, devices: int | None = None, slices: int | None = None
) -> Hardware:
    """A catalog name or a YAML/JSON profile path, sized for `devices` when given (TPU: the slice shape
    follows from the chip count, split into `slices` equal slices over DCN when given - overriding a
    profile's `slices:`; GPU: the scale-up level holds min(devices, 8) - 72 on gb200-nvl72 - and the
    scale-out level spans all devices)."""
    if slices is not None:
        hw = load_hardware(name_or_path)
        try:
            hw = dataclasses.replace(hw, slices=int(slices))
        except HardwareError as e:
            raise HardwareError(f"--slices {slices}: {e}") from None
        return hw if devices is None else hw.with_devices(int(devices))
    key = os.fspath(name_or_path)
    if key in hardware_names():
        hw = _build(key)
    elif os.path.isfile(key):
        data = read_yaml(key, "hardware profile", HardwareError, _PROFILE_SHAPE)  # JSON is YAML too
        if not isinstance(data, dict):
            raise HardwareError(
                f"hardware profile {key!r} holds a {type(data).__name__}, not a mapping; {_PROFILE_SHAPE}"
            )
        try:
            hw = Hardware.from_json(data)
            if hw.memory_capacity_bytes <= 0:  # (a sweep may shrink HBM below the reserve; a profile may not)
                raise HardwareError(
                    f"memory_reserve_bytes ({hw.memory_reserve_bytes}) leaves no HBM "
                    f"(hbm_bytes {hw.hbm_bytes})"
                )
            return hw if devices is None else hw.with_devices(int(devices))
        except HardwareError as e:  # name the file: the user has to edit it
            raise HardwareError(f"hardware profile {key!r}: {e}") from None
    else:
        raise HardwareError(
            f"unknown hardware {key!r}; known names: {', '.join(hardware_names())}; "
            f"a path to a YAML hardware profile (as written by `codesign calibrate`) "
            f"is also accepted"
        )
    return hw if devices is None else hw.with_devices(int(devices))

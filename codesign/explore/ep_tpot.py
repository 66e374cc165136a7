"""Time-per-output-token bound from expert-parallel all-to-all during decode (the ISCA 2025 paper's EP
example, its section on scale-up/scale-out bandwidth and inference speed).

The paper's bound, every term a field of `EPAssumptions`:

    all_to_all_s = (dispatch_bytes + combine_bytes) x tokens_per_device x experts_per_token x hidden
                   / bytes_per_s
    tpot_s       = layers x all_to_alls_per_layer x all_to_all_s
    tokens_per_s = 1 / tpot_s

* dispatch in FP8 (1 byte per element) and combine in BF16 (2 bytes): one "all-to-all" in the paper's
  arithmetic carries both directions' bytes;
* each token goes to its routed experts plus the shared one (8 + 1 = 9 for DeepSeek-V3);
* 32 tokens per device; all 61 layers (the paper does not leave out the 3 dense layers); 2 all-to-alls
  per layer (the paper's factor: 14.76 ms / 120.96 us = 122 = 61 x 2);
* compute fully overlapped, every byte crosses the network (none stays on the device), and
  latency ignored.

With `hidden=7000` (the paper rounds DeepSeek-V3's 7168 to "7K") this reproduces the paper exactly:
H800 over 400 Gb/s InfiniBand (50 GB/s per GPU): 120.96 us per all-to-all, 14.76 ms TPOT, 67.8 tokens/s;
GB200 NVL72 (900 GB/s per GPU): 6.72 us, 0.82 ms, 1,220 tokens/s. The default hidden is the config's.

The bandwidth is the catalog level that holds the EP group: the innermost level whose
`max_group_size` (0 = unbounded) is >= `ep_devices` (default 72: on H800 that is InfiniBand, 8 GPUs
per NVLink node; on GB200 NVL72 the whole group is on NVLink, as the paper assumes). The
latency-included bound adds the level's per-collective latency (`latency_s`, from the catalog) once per
collective, with `collectives_per_all_to_all` = 2 (dispatch and combine are separate collectives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from codesign.config import ConfigError, ModelConfig
from codesign.explore.kv_cache import resolve_model
from codesign.hardware.catalog import Hardware, NetworkLevel, load_hardware


@dataclass(frozen=True)
class EPAssumptions:
    tokens_per_device: int = 32
    dispatch_bytes: float = 1.0  # FP8
    combine_bytes: float = 2.0  # BF16
    hidden: int | None = None  # None: the model config's hidden size
    experts_per_token: int | None = None  # None: routed (top-k) + shared experts from the config
    layers: int | None = None  # None: all the config's layers (as the paper)
    all_to_alls_per_layer: int = 2
    ep_devices: int = 72  # picks the network level that holds the EP group
    level: str | None = None  # force a catalog level by name
    bytes_per_s: float | None = None  # override the level's per-GPU bandwidth
    latency_s: float | None = None  # override the level's per-collective latency (latency-included bound)
    collectives_per_all_to_all: int = 2  # dispatch + combine, each pays the latency once

    def resolved(self, cfg: ModelConfig) -> EPAssumptions:
        if not cfg.is_moe and self.experts_per_token is None:
            raise ConfigError(f"model {cfg.name!r} has no experts; pass experts_per_token to bound EP anyway")
        return dataclasses.replace(
            self,
            hidden=self.hidden if self.hidden is not None else cfg.hidden,
            experts_per_token=(
                self.experts_per_token
                if self.experts_per_token is not None
                else cfg.experts_per_token + cfg.n_shared_experts
            ),
            layers=self.layers if self.layers is not None else cfg.layers,
        )


def ep_level(hw: Hardware, a: EPAssumptions) -> NetworkLevel:
    if not hw.levels:
        raise ConfigError(f"hardware {hw.name!r} has no network levels")
    if a.level is not None:
        return hw.level(a.level)
    for lv in hw.levels:
        if lv.max_group_size == 0 or lv.max_group_size >= a.ep_devices:
            return lv
    return hw.levels[-1]


def ep_tpot_row(cfg: ModelConfig, hardware: str | Hardware, a: EPAssumptions) -> dict:
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    a = a.resolved(cfg)
    lv = ep_level(hw, a)
    bw = a.bytes_per_s if a.bytes_per_s is not None else lv.bytes_per_s
    lat = a.latency_s if a.latency_s is not None else lv.latency_s
    per_a2a_bytes = (
        (a.dispatch_bytes + a.combine_bytes) * a.tokens_per_device * a.experts_per_token * a.hidden
    )
    a2a = per_a2a_bytes / bw
    n = a.layers * a.all_to_alls_per_layer
    tpot = n * a2a
    a2a_lat = a2a + a.collectives_per_all_to_all * lat
    tpot_lat = n * a2a_lat
    return {
        "model": cfg.name,
        "hardware": hw.name,
        "all_to_all_s": a2a,
        "tpot_s": tpot,
        "tokens_per_s": 1.0 / tpot,
        "assumptions": dataclasses.asdict(a) | {"level": lv.name, "bytes_per_s": bw, "latency_s": lat},
        "bytes_per_all_to_all": per_a2a_bytes,
        "all_to_alls_per_token": n,
        "all_to_all_with_latency_s": a2a_lat,
        "tpot_with_latency_s": tpot_lat,
        "tokens_per_s_with_latency": 1.0 / tpot_lat,
        "sources": {
            "bytes_per_s": lv.source if a.bytes_per_s is None else "given",
            "latency_s": (getattr(lv, "latency_source", "") or "catalog") if a.latency_s is None else "given",
        },
    }


def ep_tpot(
    model: str | ModelConfig = "deepseek-v3",
    hardware: Sequence[str | Hardware] = ("h800", "gb200-nvl72"),
    assumptions: EPAssumptions | None = None,
    **overrides,
) -> dict:
    """`explore ep-tpot`: one row per hardware. `overrides` are EPAssumptions fields (e.g. hidden=7000)."""
    cfg = resolve_model(model)
    a = dataclasses.replace(assumptions or EPAssumptions(), **overrides)
    return {
        "rows": [ep_tpot_row(cfg, h, a) for h in hardware],
        "notes": [
            (
                "bound = layers x all-to-alls/layer x (dispatch+combine bytes) x tokens/device x experts/token "
                "x hidden / per-GPU bandwidth; compute fully overlapped; latency ignored (the paper's "
                "assumptions). The '+ latency' columns add the catalog level's latency per collective."
            )
        ],
    }


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def render_ep_tpot(result: dict) -> Table:
    t = Table(title="EP all-to-all bound on decode time per output token")
    for col in (
        "model",
        "hardware",
        "level",
        "GB/s",
        "all-to-all us",
        "TPOT ms",
        "tokens/s",
        "+latency: a2a us",
        "TPOT ms",
        "tokens/s",
    ):
        t.add_column(col, justify="left" if col in ("model", "hardware", "level") else "right")
    for r in result["rows"]:
        a = r["assumptions"]
        t.add_row(
            r["model"],
            r["hardware"],
            a["level"],
            f"{a['bytes_per_s'] / 1e9:,.0f}",
            f"{r['all_to_all_s'] * 1e6:.2f}",
            f"{r['tpot_s'] * 1e3:.2f}",
            _rate(r["tokens_per_s"]),
            f"{r['all_to_all_with_latency_s'] * 1e6:.2f}",
            f"{r['tpot_with_latency_s'] * 1e3:.2f}",
            _rate(r["tokens_per_s_with_latency"]),
        )
    if result["rows"]:
        a = result["rows"][0]["assumptions"]
        t.caption = (
            f"{a['tokens_per_device']} tokens/device, {a['experts_per_token']} experts/token, hidden "
            f"{a['hidden']}, dispatch {a['dispatch_bytes']:g} B + combine {a['combine_bytes']:g} B, "
            f"{a['layers']} layers x {a['all_to_alls_per_layer']} all-to-alls, EP group {a['ep_devices']}"
        )
    return t

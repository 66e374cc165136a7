"""`codesign models` and `codesign hardware`: the presets and the hardware catalog as tables."""

from __future__ import annotations

from codesign.cli._common import emit
from codesign.units import fmt_bytes, fmt_si


def cmd_models(args) -> int:
    from codesign.arithmetic import param_counts
    from codesign.presets import get_preset, preset_names

    rows = []
    for name in preset_names():
        cfg = get_preset(name)
        pc = param_counts(cfg)
        rows.append(
            {
                "name": name,
                "family": cfg.family,
                "attention": cfg.attention,
                "layers": cfg.layers,
                "hidden": cfg.hidden,
                "params_total": pc.total,
                "params_active": pc.active,
                "source": cfg.source,
            }
        )

    def render():
        from rich.table import Table

        t = Table(title="codesign model presets")
        for col in (
            "name",
            "family",
            "attention",
            "layers",
            "hidden",
            "params total",
            "active / token",
            "source",
        ):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(
                r["name"],
                r["family"],
                r["attention"],
                str(r["layers"]),
                str(r["hidden"]),
                fmt_si(r["params_total"]),
                fmt_si(r["params_active"]),
                r["source"],
            )
        return [t]

    emit(args, rows, render)
    return 0


def cmd_hardware(args) -> int:
    from codesign.hardware import list_hardware

    items = [h.to_json() for h in list_hardware()]

    def render():
        from rich.table import Table

        t = Table(
            title="codesign hardware catalog",
            caption="sources shortened; `codesign hardware --json` gives each number's full source",
        )
        for col in ("name", "kind", "bf16", "fp8", "HBM", "HBM BW", "network levels", "sources"):
            t.add_column(col, overflow="fold")
        for h in items:
            pf = h["peak_flops"]
            t.add_row(
                h["name"],
                h["kind"],
                fmt_si(pf.get("bf16"), "FLOP/s"),
                fmt_si(pf["fp8"], "FLOP/s") if pf.get("fp8") else "-",
                fmt_bytes(h["hbm_bytes"]),
                fmt_si(h["hbm_bytes_per_s"], "B/s"),
                "; ".join(_level(lv) for lv in h["levels"]) or "-",
                _short_sources(h["sources"]),
            )
        return [t]

    emit(args, items, render)
    return 0


def _level(lv: dict) -> str:
    """`nvlink ×8 450 GB/s`. The catalog is listed unsized (no device count), so a level whose group
    grows with the device count says `×all` (or `×≤N`, its largest size) instead of a meaningless `×0`."""
    n, cap = lv["group_size"], lv.get("max_group_size") or 0
    torus = lv.get("topology") == "torus"
    size = f"×{n}" if n else f"×≤{cap}" if cap else "×all"
    return f"{lv['name']}{' torus' if torus else ''} {size} {fmt_si(lv['bytes_per_s'], 'B/s')}"


def _short_sources(sources: dict[str, str]) -> str:
    """Where the chip numbers and the efficiencies come from, each cut at its first `;`, `:` or ` (`."""
    cut = lambda text: text.split(";")[0].split(":")[0].split(" (")[0].strip()
    chip = cut(sources.get("peak_flops", "")) or "-"
    eff = cut(sources.get("efficiency", ""))
    return f"{chip}; efficiency: {eff}" if eff else chip


def register(add) -> None:
    add("models", cmd_models, "list the model presets")
    add("hardware", cmd_hardware, "list the hardware catalog")

"""`codesign models` and `codesign hardware`: the presets and the hardware catalog as tables."""

from __future__ import annotations

from codesign.cli._common import emit


def cmd_models(args) -> int:
    from codesign.arithmetic import param_counts
    from codesign.presets import get_preset, preset_names

    rows = []
    for name in preset_names():
        cfg = get_preset(name)
        pc = param_counts(cfg)
        rows.append({"name": name, "family": cfg.family, "attention": cfg.attention, "layers": cfg.layers,
                     "hidden": cfg.hidden, "params_total": pc.total, "params_active": pc.active,
                     "source": cfg.source})

    def render():
        from rich.table import Table

        t = Table(title="codesign model presets")
        for col in ("name", "family", "attention", "layers", "hidden", "params total", "active / token", "source"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["name"], r["family"], r["attention"], str(r["layers"]), str(r["hidden"]),
                      _human(r["params_total"]), _human(r["params_active"]), r["source"])
        return [t]

    emit(args, rows, render)
    return 0


def cmd_hardware(args) -> int:
    from codesign.hardware import list_hardware

    items = [h.to_json() for h in list_hardware()]

    def render():
        from rich.table import Table

        t = Table(title="codesign hardware catalog")
        for col in ("name", "kind", "bf16", "fp8", "HBM", "HBM BW", "network levels"):
            t.add_column(col, overflow="fold")
        for h in items:
            levels = "; ".join(f"{lv['name']}×{lv['group_size']} {lv['bytes_per_s'] / 1e9:.0f} GB/s"
                               for lv in h["levels"])
            pf = h["peak_flops"]
            t.add_row(h["name"], h["kind"], _human(pf.get("bf16", 0), "FLOP/s"),
                      _human(pf["fp8"], "FLOP/s") if pf.get("fp8") else "-", _human(h["hbm_bytes"], "B", 1024),
                      _human(h["hbm_bytes_per_s"], "B/s"), levels)
        return [t]

    emit(args, items, render)
    return 0


def _human(x: float, unit: str = "", base: int = 1000) -> str:
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(x) < base:
            return f"{x:.3g} {suffix}{unit}".strip()
        x /= base
    return f"{x:.3g} Z{unit}"


def register(add) -> None:
    add("models", cmd_models, "list the model presets")
    add("hardware", cmd_hardware, "list the hardware catalog")

"""Figures from the package's results, for notebooks and reports.

Each function draws one figure from something the package returns (a `Plan`, an explore result dict,
`run_training` / `run_validation` / `run_calibration` results) and returns the matplotlib `Figure`.
Nothing here picks a backend or writes a file: a notebook shows the figure inline (`plt.show()`),
a script saves it (`fig.savefig(path)`).

* `pareto(plan)`: step time vs memory per device of every scored layout, the Pareto front, the choice.
* `memory_breakdown(parts, capacity_bytes)`: stacked bars of per-device memory (closed form vs compiler).
* `kv_cache(result)`, `flops_per_token(result)`, `ep_tpot(result)`: the ISCA 2025 tables as bars.
* `decode_throughput(results)`: decode tokens/s per GPU vs context for MLA / GQA / MHA.
* `sweep(result, metric)`: the best plan's metric over one knob (line) or two (heatmap).
* `loss_curves(runs)`: training loss of several runs on one axis, restore points marked.
* `estimated_vs_measured(validation)`: the cost model's step time against the measured one.
* `calibration(result)`: measured matmul throughput by size and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

GB = 1e9


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _get(obj: Any, name: str) -> Any:
    """A field of a result object or of its JSON dict."""
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def _label(v: Any) -> str:
    """Knob values as people write them: 25e9 -> 25G."""
    if isinstance(v, (int, float)) and abs(v) >= 1e3:
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
            if abs(v) >= div:
                return f"{v / div:g}{suffix}"
    return str(v)


# -- the planner -----------------------------------------------------------------------------------
def pareto_front(points: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The layouts that fit and that no other fitting layout beats in both memory and step time."""
    front, best_t = [], math.inf
    for p in sorted(
        (p for p in points if p["fits"]), key=lambda p: (p["memory_per_device_bytes"], p["step_time_s"])
    ):
        if p["step_time_s"] < best_t:
            front.append(p)
            best_t = p["step_time_s"]
    return front


def pareto(plan, title: str | None = None):
    """Every analytically scored layout (fits / does not fit), the Pareto front, the compiled ones, the pick."""
    plt = _plt()
    pts = plan.scored or plan.candidates  # a plan loaded from JSON has no `scored`; its candidates stand in
    cap = plan.hardware["memory_capacity_bytes"] / GB
    fig, ax = plt.subplots(figsize=(8, 5.5))

    def xy(rows):
        return [r["memory_per_device_bytes"] / GB for r in rows], [r["step_time_s"] for r in rows]

    ax.scatter(*xy([p for p in pts if not p["fits"]]), s=8, c="lightgray", label="does not fit (analytic)")
    ax.scatter(*xy([p for p in pts if p["fits"]]), s=8, c="tab:blue", alpha=0.5, label="fits (analytic)")
    ax.plot(*xy(pareto_front(pts)), "-o", c="tab:orange", ms=3, label="Pareto front")
    compiled = [c for c in plan.candidates if c.get("compiled") and c.get("evidence") != "analytic"]
    if compiled:
        ax.scatter(*xy(compiled), marker="s", facecolors="none", edgecolors="k", label="compiled")
    best = plan.best
    if best:
        ax.scatter(
            [best["memory_per_device_bytes"] / GB],
            [best["step_time_s"]],
            marker="*",
            s=250,
            c="tab:red",
            label=f"chosen: {best['strategy']['spec']}",
            zorder=5,
        )
    ax.axvline(cap, ls="--", c="k", lw=0.8, label=f"capacity {cap:.0f} GB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory per device (GB)")
    ax.set_ylabel("step time (s)")
    ax.set_title(title or f"{plan.model['name']} on {plan.hardware['devices']}× {plan.hardware['name']}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def memory_breakdown(parts: Mapping[str, Mapping[str, float]], capacity_bytes: float, title: str = ""):
    """One stacked bar per source, e.g. {"closed form": {"params": ..., "grads": ...}, "TPU compiler":
    {"arguments": ..., "temporaries": ...}}, in bytes per device, with the device's capacity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen: dict[str, str] = {}  # component -> colour; each component is labelled once
    for i, (source, comps) in enumerate(parts.items()):
        bottom = 0.0
        for name, value in comps.items():
            if not value:
                continue
            new = name not in seen
            color = seen.setdefault(name, colors[len(seen) % len(colors)])
            ax.bar(
                i, value / GB, 0.6, bottom=bottom, color=color, edgecolor="white", label=name if new else None
            )
            if value / GB > 0.04 * capacity_bytes / GB:
                ax.text(
                    i,
                    bottom + value / GB / 2,
                    f"{name}\n{value / GB:.1f} GB",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
            bottom += value / GB
        ax.text(i, bottom, f"{bottom:.1f} GB", ha="center", va="bottom", fontsize=8)
    ax.axhline(capacity_bytes / GB, ls="--", c="k", lw=0.8, label=f"capacity {capacity_bytes / GB:.1f} GB")
    ax.set_xticks(range(len(parts)), list(parts))
    ax.set_xlim(-0.8, len(parts) - 0.2)
    ax.set_ylabel("GB per device")
    ax.set_title(title or "memory per device")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


# -- the explorer ------------------------------------------------------------------------------------
def kv_cache(result: Mapping[str, Any]):
    """`kv_cache_table(...)`: KV cache KB per token per model, with the ratio to the smallest."""
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = {"mla": "tab:green", "gqa": "tab:blue", "mha": "tab:red"}
    bars = ax.bar(
        [r["model"] for r in rows],
        [r["kv_bytes_per_token"] / 1e3 for r in rows],
        color=[colors.get(r["attention"], "tab:gray") for r in rows],
    )
    for b, r in zip(bars, rows):
        ax.annotate(
            f"{r['attention'].upper()}\n{r['kv_bytes_per_token'] / 1e3:,.1f} KB\n{r['ratio']:.2f}×",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, max(r["kv_bytes_per_token"] for r in rows) / 1e3 * 1.35)
    ax.set_ylabel(f"KV cache per token (KB, {rows[0].get('dtype', 'bf16')})")
    ax.set_title("KV cache per token (ISCA 2025 Table 1)")
    fig.tight_layout()
    return fig


def flops_per_token(result: Mapping[str, Any]):
    """`flops_table(...)`: training GFLOPs per token, analytic (and compiled when present) vs the paper."""
    plt = _plt()
    rows = result["rows"]
    series = [
        ("analytic, causal (paper's convention)", "gflops_per_token_analytic", "tab:green"),
        ("analytic, full T×T", "gflops_per_token_analytic_full", "tab:blue"),
        ("compiled, full T×T (XLA)", "gflops_per_token_compiled", "tab:cyan"),
        ("paper", "paper_gflops_per_token", "black"),
    ]
    series = [s for s in series if any(r.get(s[1]) for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 0.8 / len(series)
    for i, (label, key, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(rows))]
        ax.bar(
            xs,
            [r.get(key) or 0.0 for r in rows],
            w,
            label=label,
            color=color,
            alpha=0.35 if key == "paper_gflops_per_token" else 1.0,
        )
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel(f"training GFLOPs per token (seq {rows[0]['seq_len']})")
    ax.set_title("Training FLOPs per token (ISCA 2025 Table 2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def ep_tpot(result: Mapping[str, Any]):
    """`ep_tpot(...)`: the expert-parallel all-to-all bound on time per output token, per system."""
    plt = _plt()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["tpot_s"] * 1e3 for r in rows], 0.4, label="bandwidth bound")
    ax.bar(
        [i + 0.2 for i in x],
        [r["tpot_with_latency_s"] * 1e3 for r in rows],
        0.4,
        label="+ latency per collective",
    )
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['tpot_s'] * 1e3:.2f} ms\n{r['tokens_per_s']:,.0f} tok/s",
            (i - 0.2, r["tpot_s"] * 1e3),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [f"{r['hardware']}\n({r['assumptions']['level']})" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("TPOT bound from EP all-to-all (ms)")
    ax.set_title(f"EP decode bound, {rows[0]['model']} (hidden {rows[0]['assumptions']['hidden']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def decode_throughput(results: Mapping[str, Mapping[str, Any]]):
    """{hardware: `decode_throughput(...)`}: memory-bound (solid) and roofline (dashed) decode tokens/s
    per GPU against context length, one panel per hardware, one colour per attention variant."""
    plt = _plt()
    colors = {"mla": "tab:green", "gqa": "tab:blue", "mha": "tab:red"}
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (hw, res) in zip(axes[0], results.items()):
        for kind in dict.fromkeys(r["variant"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["variant"] == kind and r["batch"] > 0]
            if not rows:
                continue
            color = colors.get(kind)
            ctx = [r["context"] for r in rows]
            kb = rows[0]["kv_bytes_per_token"] / 1e3
            ax.plot(
                ctx,
                [r["tokens_per_s_per_gpu"] for r in rows],
                "o-",
                color=color,
                label=f"{kind.upper()} ({kb:,.0f} KB/token): memory-bound",
            )
            ax.plot(
                ctx,
                [r["tokens_per_s_per_gpu_roofline"] for r in rows],
                "x--",
                color=color,
                alpha=0.6,
                label=f"{kind.upper()}: with compute roofline",
            )
        a = res["assumptions"]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s per GPU (largest batch that fits)")
        ax.set_title(f"{a['model']} body on {a['devices']}× {hw}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep(result, metric: str = "mfu"):
    """`run_sweep(...)` (or its JSON): a line over one knob, a heatmap over two, the winning layout written in."""
    import numpy as np

    plt = _plt()
    points = _get(result, "points")
    knobs = list(points[0]["knobs"])

    def val(p):
        return p.get(metric) if p.get(metric) is not None else math.nan

    fig, ax = plt.subplots(figsize=(8.5, 5))
    if len(knobs) == 1:
        k = knobs[0]
        ax.plot(range(len(points)), [val(p) for p in points], "-o")
        ax.set_xticks(range(len(points)), [_label(p["knobs"][k]) for p in points])
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        for i, p in enumerate(points):
            ax.annotate(p.get("best_spec") or "no fit", (i, val(p)), fontsize=6, rotation=15)
    else:
        k1, k2 = knobs[:2]
        v1 = list(dict.fromkeys(p["knobs"][k1] for p in points))
        v2 = list(dict.fromkeys(p["knobs"][k2] for p in points))
        grid = np.full((len(v1), len(v2)), np.nan)
        for p in points:
            grid[v1.index(p["knobs"][k1]), v2.index(p["knobs"][k2])] = val(p)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_yticks(range(len(v1)), [_label(v) for v in v1])
        ax.set_xticks(range(len(v2)), [_label(v) for v in v2])
        ax.set_ylabel(k1)
        ax.set_xlabel(k2)
        for p in points:
            m = val(p)
            text = (p.get("best_spec") or "no fit").replace(",", "\n")
            if not math.isnan(m):
                text = f"{m:.1%}\n{text}" if metric == "mfu" else f"{m:.3g}\n{text}"
            ax.text(
                v2.index(p["knobs"][k2]),
                v1.index(p["knobs"][k1]),
                text,
                ha="center",
                va="center",
                fontsize=6,
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
            )
    ax.set_title(f"sweep: {metric} of the best plan at each point")
    fig.tight_layout()
    return fig


# -- training and validation -------------------------------------------------------------------------
def loss_curves(runs: Mapping[str, Mapping[str, Any]], title: str = "training loss"):
    """{label: `run_training(...)` result}: loss per step of every run on one axis. With several runs the
    first is drawn as a wide translucent band, a reference the others can be read against; a run that
    resumed from a checkpoint gets a dotted line at the step it restored."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, run) in enumerate(runs.items()):
        steps = run["steps"]
        xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
        name = f"{label} ({run['strategy']})" if run.get("strategy") else label
        if i == 0 and len(runs) > 1:
            ax.plot(xs, ys, lw=6, alpha=0.3, c="gray", solid_capstyle="round", label=name)
        else:
            ax.plot(xs, ys, marker="o", ms=3, ls="-" if i <= 1 else "--", label=name)
        if run.get("resumed_from") is not None:
            ax.axvline(run["resumed_from"], ls=":", c="gray", lw=1)
            ax.annotate(
                f"restored step {run['resumed_from']}",
                (run["resumed_from"], max(ys)),
                fontsize=7,
                ha="right",
                va="top",
                rotation=90,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def estimated_vs_measured(validation: Mapping[str, Any]):
    """`run_validation(...)`: estimated vs measured step time per layout, with the y = x line."""
    plt = _plt()
    rows = [r for r in validation["rows"] if r.get("measured_step_time_s")]
    fig, ax = plt.subplots(figsize=(6, 5))
    est = [r["estimated_step_time_s"] for r in rows]
    meas = [r["measured_step_time_s"] for r in rows]
    ax.scatter(est, meas, c="tab:blue")
    for r, x, y in zip(rows, est, meas):
        ax.annotate(f"{r['spec']}\n×{y / x:.2f}" if x else r["spec"], (x, y), fontsize=7)
    if rows:
        lo, hi = min(est + meas) * 0.8, max(est + meas) * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = estimated")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("estimated step time (s)")
    ax.set_ylabel("measured step time (s)")
    rho = validation.get("rank_correlation")
    ax.set_title(
        f"{validation.get('model', '')} on {validation.get('devices', '?')}× "
        f"{validation.get('device_kind', '')}" + (f"; rank correlation {rho:.2f}" if rho is not None else "")
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def calibration(result: Mapping[str, Any]):
    """`run_calibration(...)` (or `codesign calibrate --json`): matmul TFLOP/s by size, one line per dtype."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = [r for r in result["matmul"] if "flops_per_s" in r]
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dt]
        ax.plot([r["n"] for r in mine], [r["flops_per_s"] / 1e12 for r in mine], "o-", label=dt)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("matmul size n (n×n @ n×n)")
    ax.set_ylabel("TFLOP/s per device")
    hbm = result.get("hbm_bytes_per_s")
    ax.set_title(
        f"{result.get('device_kind', '')}: measured matmul" + (f"; HBM {hbm / 1e12:.2f} TB/s" if hbm else "")
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

"""Presenting a plan: the ranked table and the Pareto plot (MaxText overrides: `export_maxtext`)."""

from __future__ import annotations

import math
from typing import Any

from codesign.units import GiB, fmt_bytes


def plan_table(plan, top: int | None = None):
    from rich.table import Table

    cap = plan.hardware["memory_capacity_bytes"]
    t = Table(
        title=f"{plan.model['name']} on {plan.hardware['devices']}× {plan.hardware['name']} — "
        f"batch {plan.workload['global_batch']}×{plan.workload['seq_len']}"
    )
    for col in (
        "rank",
        "strategy",
        "fits",
        "mem/device",
        "step time",
        "tokens/s",
        "MFU",
        "exposed comm",
        "evidence",
    ):
        # The strategy is never wrapped or cut: people copy it into --strategy.
        t.add_column(
            col, justify="left" if col in ("strategy", "evidence") else "right", no_wrap=col == "strategy"
        )
    for i, r in enumerate(plan.candidates[: top or len(plan.candidates)]):
        mem = r["memory_per_device_bytes"]
        mark = "→ " if i == plan.chosen else ""
        outcome = (r.get("compile") or {}).get("outcome")
        fits = "yes" if r["fits"] else ("OOM" if outcome == "oom" else "no")
        if outcome in ("error", "timeout"):
            fits = outcome
        t.add_row(
            f"{mark}{r['rank']}",
            r["strategy"]["spec"],
            fits,
            f"{fmt_bytes(mem)} ({mem / cap:.0%})",
            _num(r["step_time_s"], "{:.3g} s"),
            _num(r["tokens_per_s"], "{:,.0f}"),
            _num(r["mfu"], "{:.1%}"),
            _num(r["breakdown"].get("exposed_collective_s", 0), "{:.3g} s"),
            r["evidence"],
        )
    return t


def _num(x, fmt: str) -> str:
    return "-" if x is None or not math.isfinite(x) else fmt.format(x)


def search_summary(plan) -> str:
    s = plan.search
    rej = ", ".join(f"{k}: {v}" for k, v in sorted(plan.rejected.items(), key=lambda kv: -kv[1])[:4])
    return (
        f"searched {s['enumerated']} layouts ({s['pruned']} pruned{'; ' + rej if rej else ''}), scored "
        f"{s['scored']} analytically, compiled {s['compiled']} on target {s['target']} "
        f"({s['cache_hits']} from cache) in {s['wall_s']:.1f} s"
        + ("; this plan read back from the plan cache" if s.get("plan_cache") else "")
    )


CLIP_X_CAPACITY = 10.0  # the plot's memory axis ends at this multiple of the HBM capacity


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fitting points no other fitting point beats on both memory and step time, by memory."""
    front, best_t = [], float("inf")
    for p in sorted(
        (p for p in points if p["fits"]), key=lambda p: (p["memory_per_device_bytes"], p["step_time_s"])
    ):
        if p["step_time_s"] < best_t:
            front.append(p)
            best_t = p["step_time_s"]
    return front


def plot_pareto(plan, path: str) -> None:
    """Write `pareto_figure(plan)` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(plan)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_figure(plan):
    """Step time vs memory per device for every scored candidate; the Pareto front, the HBM line and the
    choice marked. Both axes are logarithmic and memory is clipped at 10x the HBM capacity: it spans
    orders of magnitude between the leanest layout and replicated ones, and a linear axis up to the
    largest candidate squeezes every layout that fits into a sliver left of the HBM line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = lambda b: b / GiB
    cap = gib(plan.hardware["memory_capacity_bytes"])
    pts = [p for p in plan.scored if p["memory_per_device_bytes"] > 0 and p["step_time_s"] > 0]
    shown = [p for p in pts if gib(p["memory_per_device_bytes"]) <= CLIP_X_CAPACITY * cap]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    fit = [p for p in shown if p["fits"]]
    nofit = [p for p in shown if not p["fits"]]
    hidden = len(pts) - len(shown)
    ax.scatter(
        [gib(p["memory_per_device_bytes"]) for p in nofit],
        [p["step_time_s"] for p in nofit],
        s=8,
        c="lightgray",
        label="does not fit (analytic)"
        + (f"; {hidden} above {CLIP_X_CAPACITY:g}× HBM not shown" if hidden else ""),
    )
    ax.scatter(
        [gib(p["memory_per_device_bytes"]) for p in fit],
        [p["step_time_s"] for p in fit],
        s=8,
        c="tab:blue",
        alpha=0.5,
        label="fits (analytic)",
    )
    front = pareto_front(pts)
    ax.plot(
        [gib(p["memory_per_device_bytes"]) for p in front],
        [p["step_time_s"] for p in front],
        "-o",
        c="tab:orange",
        ms=4,
        label=f"Pareto front ({len(front)} layouts)",
    )
    comp = [c for c in plan.candidates if c.get("compiled") and c["memory_per_device_bytes"] > 0]
    ax.scatter(
        [gib(c["memory_per_device_bytes"]) for c in comp],
        [c["step_time_s"] for c in comp],
        marker="s",
        facecolors="none",
        edgecolors="k",
        label="compiled",
    )
    if plan.best:
        b = plan.best
        ax.scatter(
            [gib(b["memory_per_device_bytes"])],
            [b["step_time_s"]],
            marker="*",
            s=250,
            c="tab:red",
            label=f"chosen: {b['strategy']['spec']}",
            zorder=5,
        )
    ax.axvline(
        cap, ls="--", c="k", lw=0.8, label=f"HBM capacity {fmt_bytes(plan.hardware['memory_capacity_bytes'])}"
    )
    ax.set_xscale("log")
    ax.axvspan(cap, max(ax.get_xlim()[1], cap * 1.5), color="lightgray", alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("memory per device (GiB, log scale)")
    ax.set_ylabel("step time (s, log scale)")
    ax.set_title(f"{plan.model['name']} on {plan.hardware['devices']}× {plan.hardware['name']}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig

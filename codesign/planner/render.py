"""Presenting a plan: the ranked table and the Pareto plot (MaxText overrides: `export_maxtext`)."""

from __future__ import annotations

# The MaxText export lives in its own module; importable from here for existing callers.
from codesign.planner.export_maxtext import maxtext_export, maxtext_overrides  # noqa: F401


def plan_table(plan, top: int | None = None):
    from rich.table import Table

    cap = plan.hardware["memory_capacity_bytes"]
    t = Table(title=f"{plan.model['name']} on {plan.hardware['devices']}× {plan.hardware['name']} — "
                    f"batch {plan.workload['global_batch']}×{plan.workload['seq_len']}")
    for col in ("rank", "strategy", "fits", "mem/device", "step time", "tokens/s", "MFU", "exposed comm", "evidence"):
        t.add_column(col, justify="left" if col in ("strategy", "evidence") else "right")
    for i, r in enumerate(plan.candidates[: top or len(plan.candidates)]):
        mem = r["memory_per_device_bytes"]
        mark = "→ " if i == plan.chosen else ""
        outcome = (r.get("compile") or {}).get("outcome")
        fits = "yes" if r["fits"] else ("OOM" if outcome == "oom" else "no")
        if outcome in ("error", "timeout"):
            fits = outcome
        t.add_row(f"{mark}{r['rank']}", r["strategy"]["spec"], fits,
                  f"{mem / 1e9:.1f} GB ({mem / cap:.0%})", f"{r['step_time_s']:.3g} s",
                  f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}",
                  f"{r['breakdown'].get('exposed_collective_s', 0):.3g} s", r["evidence"])
    return t


def search_summary(plan) -> str:
    s = plan.search
    rej = ", ".join(f"{k}: {v}" for k, v in sorted(plan.rejected.items(), key=lambda kv: -kv[1])[:4])
    return (f"searched {s['enumerated']} layouts ({s['pruned']} pruned{'; ' + rej if rej else ''}), scored "
            f"{s['scored']} analytically, compiled {s['compiled']} on target {s['target']} "
            f"({s['cache_hits']} from cache) in {s['wall_s']:.1f} s")


def plot_pareto(plan, path: str) -> None:
    """Step time vs memory per device for every scored candidate; Pareto front and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = plan.scored
    cap = plan.hardware["memory_capacity_bytes"] / 1e9
    fig, ax = plt.subplots(figsize=(8, 5.5))
    fit = [p for p in pts if p["fits"]]
    nofit = [p for p in pts if not p["fits"]]
    ax.scatter([p["memory_per_device_bytes"] / 1e9 for p in nofit], [p["step_time_s"] for p in nofit], s=8,
               c="lightgray", label="does not fit (analytic)")
    ax.scatter([p["memory_per_device_bytes"] / 1e9 for p in fit], [p["step_time_s"] for p in fit], s=8,
               c="tab:blue", alpha=0.5, label="fits (analytic)")
    front, best_t = [], float("inf")
    for p in sorted(fit, key=lambda p: (p["memory_per_device_bytes"], p["step_time_s"])):
        if p["step_time_s"] < best_t:
            front.append(p)
            best_t = p["step_time_s"]
    ax.plot([p["memory_per_device_bytes"] / 1e9 for p in front], [p["step_time_s"] for p in front], "-o",
            c="tab:orange", ms=3, label="Pareto front")
    comp = [c for c in plan.candidates if c.get("compiled")]
    ax.scatter([c["memory_per_device_bytes"] / 1e9 for c in comp], [c["step_time_s"] for c in comp], marker="s",
               facecolors="none", edgecolors="k", label="compiled")
    if plan.best:
        b = plan.best
        ax.scatter([b["memory_per_device_bytes"] / 1e9], [b["step_time_s"]], marker="*", s=250, c="tab:red",
                   label=f"chosen: {b['strategy']['spec']}", zorder=5)
    ax.axvline(cap, ls="--", c="k", lw=0.8, label=f"capacity {cap:.0f} GB")
    ax.set_xlabel("memory per device (GB)")
    ax.set_ylabel("step time (s)")
    ax.set_yscale("log")
    ax.set_title(f"{plan.model['name']} on {plan.hardware['devices']}× {plan.hardware['name']}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

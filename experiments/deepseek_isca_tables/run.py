"""Regenerate the ISCA 2025 DeepSeek paper's Table 1 (KV cache), Table 2 (training FLOPs) and the EP
TPOT bound with codesign's explorer: writes results.json, results.md and tables.png next to this file.

    python experiments/deepseek_isca_tables/run.py            # compiles 4 models for CPU (~2-3 min)
    python experiments/deepseek_isca_tables/run.py --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = Path(__file__).resolve().parent
KV_MODELS = ["deepseek-v3", "qwen2.5-72b", "llama3.1-405b"]
FLOPS_MODELS = ["deepseek-v2", "deepseek-v3", "qwen2.5-72b", "llama3.1-405b"]


def markdown(kv: dict, fl: dict, ep_paper: dict, ep_cfg: dict) -> str:
    out = [
        "### Table 1: KV cache per token (BF16, 1 KB = 1000 B)",
        "",
        "| model | attention | formula | KB/token | ratio | paper KB | paper ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in kv["rows"]:
        out.append(
            f"| {r['model']} | {r['attention'].upper()} | {r['formula']} | {r['kv_kb_per_token']:.3f} | "
            f"{r['ratio']:.2f}x | {r['paper_kb_per_token']:.3f} | {r['paper_ratio']:.2f}x |"
        )
    out += [
        "",
        "### Table 2: training GFLOPs per token, seq 4096",
        "",
        (
            "| model | analytic causal | paper | vs paper | analytic full | compiled (full) | compiled / analytic full "
            "| compiled -> causal | compile s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def g(x, f="{:,.1f}"):
        return "-" if x is None else f.format(x)

    for r in fl["rows"]:
        c = r.get("compile") or {}
        out.append(
            f"| {r['model']} | {g(r['gflops_per_token_analytic'])} | {g(r['paper_gflops_per_token'], '{:,.0f}')} | "
            f"{g(r['analytic_vs_paper'], '{:+.1%}')} | {g(r['gflops_per_token_analytic_full'])} | "
            f"{g(r['gflops_per_token_compiled'])} | {g(r['compiled_vs_analytic'], '{:.5f}')} | "
            f"{g(r['gflops_per_token_compiled_causal'])} | {g(c.get('compile_s'), '{:.1f}')} |"
        )
    for title, ep in (
        ("EP all-to-all TPOT bound, paper's assumptions (hidden 7000)", ep_paper),
        ("EP all-to-all TPOT bound, hidden from the config (7168)", ep_cfg),
    ):
        out += [
            "",
            f"### {title}",
            "",
            "| hardware | level | GB/s | all-to-all us | TPOT ms | tokens/s | + latency: all-to-all us | TPOT ms | tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ep["rows"]:
            a = r["assumptions"]
            out.append(
                f"| {r['hardware']} | {a['level']} | {a['bytes_per_s'] / 1e9:,.0f} | {r['all_to_all_s'] * 1e6:.2f} | "
                f"{r['tpot_s'] * 1e3:.2f} | {r['tokens_per_s']:,.1f} | {r['all_to_all_with_latency_s'] * 1e6:.2f} | "
                f"{r['tpot_with_latency_s'] * 1e3:.2f} | {r['tokens_per_s_with_latency']:,.1f} |"
            )
    return "\n".join(out) + "\n"


def plot(kv: dict, fl: dict, ep_paper: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    names = [r["model"] for r in kv["rows"]]
    vals = [r["kv_kb_per_token"] for r in kv["rows"]]
    bars = ax.bar(names, vals, color=["tab:green", "tab:blue", "tab:blue"])
    for b, r in zip(bars, kv["rows"]):
        ax.annotate(
            f"{r['kv_kb_per_token']:.3f} KB\n{r['ratio']:.2f}x",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("KV cache KB per token (BF16)")
    ax.set_title("Table 1: KV cache per token")
    ax.set_ylim(0, max(vals) * 1.25)

    ax = axes[1]
    rows = fl["rows"]
    xs = range(len(rows))
    series = [
        ("analytic causal (paper convention)", "gflops_per_token_analytic", "tab:green"),
        ("compiled -> causal", "gflops_per_token_compiled_causal", "tab:olive"),
        ("analytic full TxT", "gflops_per_token_analytic_full", "tab:blue"),
        ("compiled full TxT (XLA)", "gflops_per_token_compiled", "tab:cyan"),
    ]
    w = 0.2
    for i, (label, key, color) in enumerate(series):
        ys = [(r[key] or 0.0) / r["paper_gflops_per_token"] for r in rows]
        ax.bar([x + (i - 1.5) * w for x in xs], ys, w, label=label, color=color)
    ax.axhline(1.0, color="black", lw=1)
    ax.axhspan(0.97, 1.03, color="grey", alpha=0.2, label="paper +-3%")
    ax.set_xticks(
        list(xs), [f"{r['model']}\n(paper {r['paper_gflops_per_token']:,.0f})" for r in rows], fontsize=8
    )
    ax.set_ylim(0.9, 1.25)
    ax.set_ylabel("GFLOPs per token / paper's Table 2")
    ax.set_title("Table 2: training FLOPs per token (seq 4096)")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[2]
    hw = [r["hardware"] for r in ep_paper["rows"]]
    x = range(len(hw))
    ax.bar(
        [i - 0.2 for i in x],
        [r["tpot_s"] * 1e3 for r in ep_paper["rows"]],
        0.4,
        label="bound (latency ignored)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["tpot_with_latency_s"] * 1e3 for r in ep_paper["rows"]],
        0.4,
        label="+ catalog latency per collective",
    )
    for i, r in enumerate(ep_paper["rows"]):
        ax.annotate(
            f"{r['tpot_s'] * 1e3:.2f} ms\n{r['tokens_per_s']:,.1f} tok/s",
            (i - 0.2, r["tpot_s"] * 1e3),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), hw)
    ax.set_yscale("log")
    ax.set_ylabel("TPOT from EP all-to-all (ms)")
    ax.set_title("EP decode bound, DeepSeek-V3 (hidden 7000)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="analytic FLOPs only (skip the CPU compiles)")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)

    from codesign.explore import ep_tpot, flops_table, kv_cache_table

    kv = kv_cache_table(KV_MODELS, dtype="bf16")
    fl = flops_table(FLOPS_MODELS, seq_len=4096, compile=not args.no_compile)
    ep_paper = ep_tpot("deepseek-v3", ["h800", "gb200-nvl72"], hidden=7000)
    ep_cfg = ep_tpot("deepseek-v3", ["h800", "gb200-nvl72"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"kv_cache": kv, "flops": fl, "ep_tpot_paper": ep_paper, "ep_tpot_config": ep_cfg}, indent=1
        )
    )
    md = markdown(kv, fl, ep_paper, ep_cfg)
    (args.out / "results.md").write_text(md)
    plot(kv, fl, ep_paper, args.out / "tables.png")
    print(md)


if __name__ == "__main__":
    main()

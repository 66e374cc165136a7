"""The cost model's single-device step time against train steps measured on one H200.

The measurements are the step rows of the shared H200 probe (`probe_steps.jsonl`, copied from
`shared/data/h200_probe.jsonl`): a hand-written plain-JAX LLaMA-style train loop at the two sizes of the
trainer issue, with XLA or cuDNN attention, three remat policies and f32 or bf16 master weights. It is
not codesign's trainer, so this checks the cost model on the same model and workload, not on the same
program. Nothing here is fitted to these rows: the estimate uses only the catalog or a profile that
`codesign calibrate` measured (matmul and HBM microbenchmarks).

    python experiments/h200_estimate_vs_probe/run.py [--hardware h200 --hardware PROFILE.yaml]

Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from codesign.arithmetic import train_flops_per_token
from codesign.config import ModelConfig, Workload
from codesign.cost.estimate import estimate_analytic
from codesign.hardware import load_hardware
from codesign.sharding.strategy import Strategy

HERE = Path(__file__).resolve().parent
CALIBRATED = HERE.parent / "h200_checks" / "h200_calibrated.yaml"


def probe_rows(path: Path) -> list[dict]:
    """The probe's step rows. Untagged rows are its first, untuned run: XLA attention, full remat, f32."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("sec") != "step":
            continue
        rows.append(
            {
                **r,
                "remat": r.get("remat", "full"),
                "attn": r.get("attn", "xla"),
                "pdtype": r.get("pdtype", "float32"),
            }
        )
    return rows


def model_of(c: dict) -> ModelConfig:
    return ModelConfig(
        name=f"llama-d{c['D']}-l{c['L']}",
        vocab_size=c["V"],
        hidden=c["D"],
        layers=c["L"],
        heads=c["H"],
        kv_heads=c["H"],
        mlp_dim=c["F"],
        attention="mha",
    )


def compare(rows: list[dict], hardware: str) -> list[dict]:
    hw = load_hardware(hardware, devices=1)
    out = []
    for r in rows:
        c = r["cfg"]
        cfg = model_of(c)
        w = Workload(global_batch=c["B"], seq_len=c["S"], param_dtype=r["pdtype"], attention=r["attn"])
        e = estimate_analytic(cfg, w, Strategy.parse(f"data=1,remat={r['remat']}"), hw)
        measured_mfu = train_flops_per_token(cfg, c["S"]) * c["B"] * c["S"] / (r["s"] * hw.peak_flops["bf16"])
        out.append(
            {
                "model": f"{r['params'] / 1e9:.2f}B",
                "batch": f"{c['B']}x{c['S']}",
                "attention": r["attn"],
                "remat": r["remat"],
                "param_dtype": r["pdtype"],
                "measured_s": r["s"],
                "estimated_s": e.step_time_s,
                "ratio": e.step_time_s / r["s"],
                "measured_mfu": measured_mfu,
                "estimated_mfu": e.mfu,
                "matmul_kernels_s": e.compute_s,
                "memory_bound_kernels_s": max(e.memory_s, e.vector_s),
                "memory_fits": e.fits,
            }
        )
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for i, j in enumerate(order):
            r[j] = i
        return r

    rx, ry, n = ranks(xs), ranks(ys), len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def markdown(results: dict[str, list[dict]]) -> str:
    lines = []
    for hw, rows in results.items():
        ratios = [r["ratio"] for r in rows]
        inside = sum(abs(x - 1) <= 0.10 for x in ratios)
        rho = spearman([r["estimated_s"] for r in rows], [r["measured_s"] for r in rows])
        title = (
            f"### `--hardware {hw}`: estimated / measured median {statistics.median(ratios):.2f}, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}, {inside} of {len(rows)} within +-10%, "
            f"rank correlation {rho:.2f}"
        )
        header = (
            "| model | batch | attention | remat | params | measured ms | estimated ms | est/meas | "
            "measured MFU | matmul kernels ms | memory-bound kernels ms |"
        )
        lines += [title, "", header, "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['attention']} | {r['remat']} | {r['param_dtype']} | "
                f"{r['measured_s'] * 1e3:.1f} | {r['estimated_s'] * 1e3:.1f} | {r['ratio']:.2f} | "
                f"{r['measured_mfu']:.1%} | {r['matmul_kernels_s'] * 1e3:.1f} | "
                f"{r['memory_bound_kernels_s'] * 1e3:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--hardware",
        action="append",
        help=f"catalog name or profile (default: h200 and {CALIBRATED.relative_to(HERE.parent.parent)})",
    )
    ap.add_argument("--probe", default=str(HERE / "probe_steps.jsonl"))
    args = ap.parse_args()
    hardware = args.hardware or ["h200", str(CALIBRATED.relative_to(HERE.parent.parent))]
    rows = probe_rows(Path(args.probe))
    results = {hw: compare(rows, hw) for hw in hardware}
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (HERE / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

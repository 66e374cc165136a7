"""Memory-bound decode throughput per GPU vs context length for MLA / GQA / MHA variants of the
DeepSeek-V3 body: writes results.json, results.md and decode.png next to this file.

    python experiments/mla_vs_gqa_decode/run.py [--hardware h800,gb200-nvl72] [--devices 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE_CONTEXTS = (4096, 32768, 131072)


def markdown(results: dict[str, dict]) -> str:
    out = []
    for hw, res in results.items():
        a = res["assumptions"]
        out += [
            (
                f"### {hw}: {a['hbm_usable_bytes'] / 1e9:.1f} GB usable HBM at {a['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                f"{a['peak_flops'] / 1e12:,.0f} TFLOP/s {a['compute_dtype']}"
            ),
            "",
            "| attention | KV KB/token | context | batch | memory-bound tok/s/GPU | roofline tok/s/GPU | bound |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in res["rows"]:
            if r["context"] in TABLE_CONTEXTS:
                out.append(
                    f"| {r['variant']} ({r['model']}) | {r['kv_bytes_per_token'] / 1000:,.1f} | {r['context']:,} | "
                    f"{r['batch']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s_per_gpu_roofline']:,.0f} | "
                    f"{r['bound'] if r['batch'] else 'does not fit'} |"
                )
        out.append("")
    return "\n".join(out)


def plot(results: dict[str, dict], path: Path) -> None:
    """The package's decode-throughput figure (the notebooks show the same one), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from codesign.explore.plots import decode_throughput

    decode_throughput(results).savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3")
    p.add_argument("--hardware", default="h800,gb200-nvl72")
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--weight-bytes", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)

    from codesign.explore import decode_throughput

    results = {
        hw: decode_throughput(args.model, hw, devices=args.devices, weight_bytes=args.weight_bytes)
        for hw in args.hardware.split(",")
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (args.out / "results.md").write_text(md)
    plot(results, args.out / "decode.png")
    print(md)


if __name__ == "__main__":
    main()

"""DeepSeek-V3 training on 2,048 H800-class GPUs as the NVLink domain and the InfiniBand bandwidth vary.

    python experiments/scaleup_vs_scaleout/run.py

The same sweep from the command line:
    codesign explore sweep --model deepseek-v3 --hardware h800 --devices 2048 \
        --vary scaleup_size=8,16,72 --vary scaleout_bw=25G,50G,100G --out results --plot sweep.png
Each point runs the planner (analytic) over every layout; the table records the winner.
"""

from __future__ import annotations

import json
import os

from codesign.config import default_workload
from codesign.explore.sweep import parse_vary, plot_sweep, run_sweep, write_outputs
from codesign.hardware import load_hardware
from codesign.presets import get_preset

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    cfg = get_preset("deepseek-v3")
    hw = load_hardware("h800", devices=2048)
    workload = default_workload(cfg, 2048, global_batch=4096, seq_len=4096)
    vary = parse_vary(["scaleup_size=8,16,72", "scaleout_bw=25G,50G,100G"])
    result = run_sweep(cfg, hw, workload, 2048, vary)
    write_outputs(result, os.path.join(HERE, "results"))
    plot_sweep(result, os.path.join(HERE, "sweep_mfu.png"), metric="mfu")
    lines = ["| NVLink domain | IB per GPU | best layout | step time | MFU |", "|---|---|---|---|---|"]
    for p in result.points:
        k = p["knobs"]
        lines.append(
            f"| {k['scaleup_size']} | {k['scaleout_bw'] / 1e9:g} GB/s | `{p['best_spec']}` | "
            f"{p['step_time_s']:.1f} s | {p['mfu']:.1%} |"
        )
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"wall_s": round(result.wall_s, 1)}))


if __name__ == "__main__":
    main()

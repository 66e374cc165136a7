"""The compiled pipelined step against the closed form: bubble, stage-to-stage traffic and the memory of
microbatches in flight, on a tiny preset compiled for 8 emulated CPU devices. Writes results.json and
results.md next to this file.

    python experiments/pipeline_compiled/run.py

Model: tiny-dense with 8 layers, sequence 256, bf16 compute, remat=none (so that saved activations, which
grow with the microbatches in flight, dominate the memory); every case has one stage per
device (mesh = pipeline=p only) and microbatches of 2 sequences (global batch = 2 M), so that growing M
adds microbatches of the same size.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [  # (pipeline, v, microbatches)
    (2, 1, 2),
    (2, 1, 4),
    (2, 1, 8),
    (4, 2, 4),
]
LAYERS, SEQ, MB_ROWS = 8, 256, 2


def main() -> None:
    from codesign.runtime import emulate_cpu_devices

    os.environ["JAX_PLATFORMS"] = "cpu"
    emulate_cpu_devices(os.environ, 8)
    from codesign import arithmetic
    from codesign.closed_form import analytic_memory
    from codesign.compile.targets import compile_candidate
    from codesign.config import Workload
    from codesign.hardware.catalog import load_hardware
    from codesign.presets import get_preset
    from codesign.sharding.strategy import Strategy

    cfg = get_preset("tiny-dense").replace(layers=LAYERS)
    hw = load_hardware("cpu", devices=8)
    # FLOPs per token of one layer and of everything outside the stack (embedding, head, loss).
    per_layer = arithmetic.train_flops_per_token(
        cfg.replace(layers=2), SEQ
    ) - arithmetic.train_flops_per_token(cfg.replace(layers=1), SEQ)
    outside = arithmetic.train_flops_per_token(cfg, SEQ) - LAYERS * per_layer
    ref_wl = Workload(global_batch=MB_ROWS, seq_len=SEQ)
    t0 = time.perf_counter()
    ref = compile_candidate(
        cfg, ref_wl, Strategy.parse("data=1,remat=none"), hw, "cpu"
    )  # one microbatch, one device
    rows = []
    for p, v, m in CASES:
        wl = Workload(global_batch=MB_ROWS * m, seq_len=SEQ)
        s = Strategy.parse(f"pipeline={p},microbatches={m},v={v},remat=none")
        r = compile_candidate(cfg, wl, s, hw, "cpu")
        if r.outcome != "ok":
            rows.append({"spec": s.spec, "outcome": r.outcome, "message": r.message[:300]})
            continue
        ticks = arithmetic.pipeline_ticks(m, p, v)
        loops = sorted({n for _, n, _ in r.while_loops})
        permutes = [
            c for c in r.collectives if c.kind == "collective-permute" and c.mesh_axes == ("pipeline",)
        ]
        act = MB_ROWS * SEQ * cfg.hidden * 2  # one microbatch's residual stream, bf16
        closed = analytic_memory(cfg, wl, s)
        # The stack's share of the useful FLOPs; the compiled program runs it for `ticks` chunk-passes
        # where M V are useful, and the embedding/head outside (head split over stages, embedding not).
        stack_share = LAYERS * per_layer / (LAYERS * per_layer + outside)
        rows.append(
            {
                "spec": s.spec,
                "p": p,
                "v": v,
                "m": m,
                "compile_s": round(r.compile_s, 1),
                "ticks_closed_form": ticks,
                "while_trip_counts": loops,
                "bubble_fraction_closed_form": (p - 1) / ticks,
                "bubble_fraction_compiled": (ticks - m * v) / ticks if ticks in loops else None,
                "flops_per_device": r.flops,
                # pipelined FLOPs per device x p / (the same batch unpipelined on one device)
                "flops_vs_unpipelined": r.flops * p / (ref.flops * m),
                "flops_vs_unpipelined_expected": stack_share * ticks / (m * v) + (1 - stack_share),
                "permute_count": sum(c.count for c in permutes),
                "permute_bytes": sum(c.count * c.bytes for c in permutes),
                "permute_bytes_closed_form": 2 * (m + p - 1) * act,  # cost/estimate.py's 2 per tick
                "permute_bytes_executed_expected": 2 * ticks * act,  # forward + backward rotation per tick
                "temp_bytes": r.memory.temp if r.memory else None,
                "peak_bytes": r.memory.peak if r.memory else None,
                "closed_form_saved_activations": closed.saved_activations,
                "closed_form_logits": closed.logits,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    # In-flight microbatches from the compiled memory: the temp growth per added microbatch, against
    # one microbatch's saved activations for a stage by the closed form (pipeline=2 with one microbatch).
    by_m = {r["m"]: r for r in rows if r.get("p") == 2 and r.get("v") == 1 and "temp_bytes" in r}
    per_mb_saved = analytic_memory(cfg, ref_wl, Strategy.parse("pipeline=2,remat=none")).saved_activations
    slope = None
    if 2 in by_m and 8 in by_m:
        slope = (by_m[8]["temp_bytes"] - by_m[2]["temp_bytes"]) / 6
    out = {
        "model": f"tiny-dense layers={LAYERS}",
        "seq_len": SEQ,
        "microbatch_rows": MB_ROWS,
        "reference_flops_one_microbatch": ref.flops,
        "rows": rows,
        "temp_bytes_per_added_microbatch_p2": slope,
        "stage_saved_activations_per_microbatch": per_mb_saved,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (HERE / "results.json").write_text(json.dumps(out, indent=1))
    lines = [
        (
            "| spec | ticks (closed form) | while trip counts | bubble closed / compiled | FLOPs x p vs unpipelined "
            "(expected) | pipeline permutes: count, MB (executed expected; closed form) | temp MB | closed-form "
            "saved act. MB |"
        ),
        "|---|---:|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        if "p" not in r:
            lines.append(f"| {r['spec']} | {r['outcome']}: {r['message'][:80]} |")
            continue
        bc = r["bubble_fraction_compiled"]
        lines.append(
            f"| `{r['spec']}` | {r['ticks_closed_form']} | {r['while_trip_counts']} | "
            f"{r['bubble_fraction_closed_form']:.0%} / {'-' if bc is None else f'{bc:.0%}'} | "
            f"{r['flops_vs_unpipelined']:.3f} ({r['flops_vs_unpipelined_expected']:.3f}) | "
            f"{r['permute_count']}, {r['permute_bytes'] / 1e6:.2f} ({r['permute_bytes_executed_expected'] / 1e6:.2f}; "
            f"{r['permute_bytes_closed_form'] / 1e6:.2f}) | {r['temp_bytes'] / 1e6:.2f} | "
            f"{r['closed_form_saved_activations'] / 1e6:.2f} |"
        )
    if slope is not None:
        lines.append("")
        lines.append(
            f"p=2: compiled temp grows {slope / 1e6:.3f} MB per added microbatch; one microbatch's saved "
            f"stage activations are {per_mb_saved / 1e6:.3f} MB ({slope / per_mb_saved:.2f} microbatches' worth)"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

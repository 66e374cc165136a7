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
CASES = [  # (pipeline, v, microbatches, schedule)
    (2, 1, 2, "1f1b"),
    (2, 1, 4, "1f1b"),
    (2, 1, 8, "1f1b"),
    (2, 1, 2, "gpipe"),
    (2, 1, 4, "gpipe"),
    (2, 1, 8, "gpipe"),
    (4, 2, 4, "interleaved"),
]
LAYERS, SEQ, MB_ROWS = 8, 256, 2


def main() -> None:
    from codesign.runtime import emulate_cpu_devices

    os.environ["JAX_PLATFORMS"] = "cpu"
    emulate_cpu_devices(os.environ, 8)
    from codesign import arithmetic
    from codesign.closed_form import analytic_memory
    from codesign.closed_form.pipeline import in_flight_microbatches
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
    for p, v, m, schedule in CASES:
        wl = Workload(global_batch=MB_ROWS * m, seq_len=SEQ)
        s = Strategy.parse(f"pipeline={p},microbatches={m},v={v},remat=none,schedule={schedule}")
        r = compile_candidate(cfg, wl, s, hw, "cpu")
        if r.outcome != "ok":
            rows.append({"spec": s.spec, "outcome": r.outcome, "message": r.message[:300]})
            continue
        ticks = arithmetic.pipeline_ticks(m, p, v)
        loops = sorted(n for _, n, _ in r.while_loops)
        tick_loops = arithmetic.pipeline_loops(m, p, v) if schedule != "gpipe" else (ticks,)
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
                "schedule": schedule,
                "p": p,
                "v": v,
                "m": m,
                "compile_s": round(r.compile_s, 1),
                "ticks_closed_form": ticks,
                "while_trip_counts": loops,
                "bubble_fraction_closed_form": (p - 1) / ticks,
                "tick_loops_expected": list(tick_loops),
                "bubble_fraction_compiled": (
                    (ticks - m * v) / ticks if all(n in loops for n in tick_loops if n > 1) else None
                ),
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
                "closed_form_pipeline_in_flight": closed.pipeline_in_flight,
                "closed_form_in_flight_microbatches": in_flight_microbatches(schedule, p, v, m),
                "closed_form_logits": closed.logits,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    # In-flight microbatches from the compiled memory: the temp growth per added microbatch (p=2, v=1),
    # per schedule, against one microbatch's saved activations of a stage by the closed form.
    per_mb_saved = analytic_memory(cfg, ref_wl, Strategy.parse("pipeline=2,remat=none")).saved_activations
    slopes = {}
    for schedule in ("1f1b", "gpipe"):
        by_m = {
            r["m"]: r
            for r in rows
            if r.get("p") == 2 and r.get("v") == 1 and r.get("schedule") == schedule and r.get("temp_bytes")
        }
        if 2 in by_m and 4 in by_m and 8 in by_m:
            slopes[schedule] = {
                "2_to_4": (by_m[4]["temp_bytes"] - by_m[2]["temp_bytes"]) / 2,
                "4_to_8": (by_m[8]["temp_bytes"] - by_m[4]["temp_bytes"]) / 4,
            }
    out = {
        "model": f"tiny-dense layers={LAYERS}",
        "seq_len": SEQ,
        "microbatch_rows": MB_ROWS,
        "reference_flops_one_microbatch": ref.flops,
        "rows": rows,
        "temp_bytes_per_added_microbatch_p2": slopes,
        "stage_saved_activations_per_microbatch": per_mb_saved,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (HERE / "results.json").write_text(json.dumps(out, indent=1))
    lines = [
        (
            "| spec | ticks M V + p - 1 | while trip counts | bubble closed / compiled | FLOPs x p vs unpipelined "
            "(expected) | pipeline permutes: count, MB (executed expected) | temp MB | closed-form in flight, "
            "saved + in-flight act. MB |"
        ),
        "|---|---:|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        if "p" not in r:
            lines.append(f"| {r['spec']} | {r['outcome']}: {r['message'][:80]} |")
            continue
        bc = r["bubble_fraction_compiled"]
        closed_act = r["closed_form_saved_activations"] + r["closed_form_pipeline_in_flight"]
        lines.append(
            f"| `{r['spec']}` | {r['ticks_closed_form']} | {r['while_trip_counts']} | "
            f"{r['bubble_fraction_closed_form']:.0%} / {'-' if bc is None else f'{bc:.0%}'} | "
            f"{r['flops_vs_unpipelined']:.3f} ({r['flops_vs_unpipelined_expected']:.3f}) | "
            f"{r['permute_count']}, {r['permute_bytes'] / 1e6:.2f} ({r['permute_bytes_executed_expected'] / 1e6:.2f}) | "
            f"{r['temp_bytes'] / 1e6:.1f} | {r['closed_form_in_flight_microbatches']:.3g}, {closed_act / 1e6:.1f} |"
        )
    lines.append("")
    for schedule, sl in slopes.items():
        lines.append(
            f"p=2 {schedule}: compiled temp grows {sl['2_to_4'] / 1e6:.1f} MB per added microbatch from M=2 to 4, "
            f"{sl['4_to_8'] / 1e6:.1f} MB from 4 to 8; one microbatch's saved stage activations are "
            f"{per_mb_saved / 1e6:.1f} MB by the closed form"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

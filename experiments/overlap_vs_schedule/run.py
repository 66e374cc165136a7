"""The closed-form per-kind overlap model against the compiler's own schedule, on deviceless TPU compiles.

    nice python experiments/overlap_vs_schedule/run.py            # all cases (compiles cached on disk)
    nice python experiments/overlap_vs_schedule/run.py --only 0,1 # a subset

Each case is compiled once for its TPU slice with the target's default overlap flags
(`codesign.compile.flags`); its report and HLO text are kept in `.cache/`, and every run reads the
saved HLO again with the current HLO walk (so a change to the reader needs no recompile). The same report is priced twice by `estimate_from_report`: with overlap read
from the schedule (each async collective hidden up to the compute XLA put between its start and done)
and with `overlap_from_schedule` switched off, which prices it with the per-kind model
(`codesign.cost.overlap`). Rows compare, per mesh axis and collective kind, the fraction hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from codesign.compile.hlo import analyze_hlo
from codesign.compile.worker import compile_in_subprocess
from codesign.config import Workload
from codesign.cost.estimate import estimate_from_report
from codesign.hardware import load_hardware
from codesign.presets import get_preset
from codesign.report import CompileReport
from codesign.sharding.strategy import Strategy

HERE = os.path.dirname(os.path.abspath(__file__))
# (label, preset, layers override, hardware, chips, strategy, global batch, seq len)
CASES = [
    ("tiny", "tiny-dense", None, "tpu-v5e", 8, "fsdp=8", 32, 128),
    ("tiny", "tiny-dense", None, "tpu-v5e", 8, "fsdp=4,tensor=2", 32, 128),
    ("tiny", "tiny-dense", None, "tpu-v5e", 8, "data=2,fsdp=4,microbatches=2", 32, 128),
    ("1.5B", "llama3-8b", 4, "tpu-v5e", 8, "fsdp=8", 8, 2048),
    ("1.5B", "llama3-8b", 4, "tpu-v5p", 8, "fsdp=4,tensor=2", 8, 2048),
    ("8B", "llama3-8b", None, "tpu-v5p", 64, "fsdp=16,tensor=4", 64, 2048),
]


def _case_rows(case, report, cfg, wl, s, hw):
    sched = estimate_from_report(cfg, wl, s, hw, report)
    model = estimate_from_report(cfg, wl, s, hw, dataclasses.replace(report, overlap_from_schedule=False))
    rows = []
    for label, o in sorted(sched.overlap.items(), key=lambda kv: -kv[1]["s"]):
        m = model.overlap.get(label, {})
        rows.append(
            {
                "collective": label,
                "ms": o["s"] * 1e3,
                "schedule_hidden": o["hidden"],
                "model_hidden": m.get("hidden"),
                "model_class": m.get("source"),
            }
        )
    return {
        "case": case[0],
        "model": case[1] + (f" ({case[2]} layers)" if case[2] else ""),
        "hardware": f"{case[3]} x{case[4]}",
        "strategy": s.spec,
        "busy_ms": sched.busy_s * 1e3,
        "exposed_ms_schedule": sched.exposed_collective_s * 1e3,
        "exposed_ms_model": model.exposed_collective_s * 1e3,
        "step_ms_schedule": sched.step_time_s * 1e3,
        "step_ms_model": model.step_time_s * 1e3,
        "xla_flags": report.xla_flags,
        "rows": rows,
    }


def _compiled(i: int, cfg, wl, s, hw, cache_dir: str) -> CompileReport:
    """The case's report: compiled once (report and HLO saved), then re-read from the saved HLO."""
    os.makedirs(cache_dir, exist_ok=True)
    hlo, js = os.path.join(cache_dir, f"case{i}.hlo"), os.path.join(cache_dir, f"case{i}.json")
    if os.path.exists(js):
        with open(js) as f:
            report = CompileReport.from_json(json.load(f))
    else:
        report = compile_in_subprocess(cfg, wl, s, hw, "tpu", timeout_s=3600, save_hlo=hlo)
        with open(js, "w") as f:
            json.dump(report.to_json(), f, default=str)
    if not report.ok or not os.path.exists(hlo):
        return report
    with open(hlo) as f:
        stats = analyze_hlo(f.read(), list(report.mesh))
    return dataclasses.replace(report, **stats.report_counts(), overlap_from_schedule=stats.scheduled)


def _why(r: CompileReport) -> str:
    return r.message or next((n for n in r.notes if n.startswith("hlo-unavailable")), "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated case indices")
    ap.add_argument("--cache-dir", default=os.path.join(HERE, ".cache"))
    args = ap.parse_args()
    picked = [int(i) for i in args.only.split(",")] if args.only else range(len(CASES))
    reports, meta = [], []
    for i in picked:
        case = CASES[i]
        _, preset, layers, hw_name, n, spec, gb, seq = case
        cfg = get_preset(preset)
        cfg = cfg.replace(layers=layers) if layers else cfg
        wl, s, hw = Workload(global_batch=gb, seq_len=seq), Strategy.parse(spec), load_hardware(hw_name, n)
        reports.append(_compiled(i, cfg, wl, s, hw, args.cache_dir))
        meta.append((case, cfg, wl, s, hw))
    results = []
    for (case, cfg, wl, s, hw), r in zip(meta, reports):
        if not r.ok or not r.overlap_from_schedule:
            results.append(
                {"case": case[0], "strategy": s.spec, "outcome": r.outcome, "message": _why(r)[:300]}
            )
            continue
        results.append(_case_rows(case, r, cfg, wl, s, hw))
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    lines = [
        "| model | TPU | layout | collective | ms | hidden (schedule) | hidden (model) | model class |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = [
        "| model | TPU | layout | busy ms | exposed ms (schedule) | exposed ms (model) |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        if "rows" not in res:
            lines.append(
                f"| {res['case']} | | `{res['strategy']}` | {res['outcome']}: {res['message'][:150]} | | | | |"
            )
            continue
        summary.append(
            f"| {res['model']} | {res['hardware']} | `{res['strategy']}` | {res['busy_ms']:.3g} | "
            f"{res['exposed_ms_schedule']:.3g} | {res['exposed_ms_model']:.3g} |"
        )
        for row in res["rows"]:
            mh = "" if row["model_hidden"] is None else f"{row['model_hidden']:.0%}"
            lines.append(
                f"| {res['model']} | {res['hardware']} | `{res['strategy']}` | {row['collective']} | "
                f"{row['ms']:.3g} | {row['schedule_hidden']:.0%} | {mh} | {row['model_class'] or ''} |"
            )
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(summary) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(summary) + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

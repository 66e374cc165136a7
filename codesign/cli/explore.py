"""`codesign explore …` and `codesign calibrate`: thin argument parsing over codesign.explore / calibrate."""

from __future__ import annotations

import dataclasses
import sys

from codesign.cli._common import (
    add_matmul_dtype_arg,
    add_slices_arg,
    check_output_paths,
    console,
    int_list,
    nonneg_float,
    positive_float,
    positive_int,
    print_json,
    print_wide,
)


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _print(args, result: dict, render) -> int:
    if args.json:
        print_json(result)
    else:
        console().print(render(result))
    return 0


def cmd_kv_cache(args) -> int:
    from codesign.explore.kv_cache import kv_cache_table, render_kv_cache

    return _print(args, kv_cache_table(_models(args.models), dtype=args.dtype), render_kv_cache)


def cmd_flops(args) -> int:
    from codesign.explore.flops import flops_table, render_flops

    return _print(
        args, flops_table(_models(args.models), args.seq_len, compile=not args.no_compile), render_flops
    )


def cmd_ep_tpot(args) -> int:
    from codesign.explore.ep_tpot import EPAssumptions, ep_tpot, render_ep_tpot

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EPAssumptions)
        if getattr(args, f.name, None) is not None
    }
    return _print(args, ep_tpot(args.model, _models(args.hardware), **overrides), render_ep_tpot)


def cmd_decode(args) -> int:
    from codesign.explore.decode import decode_throughput, render_decode

    return _print(
        args, decode_throughput(args.model, args.hardware, args.contexts, devices=args.devices), render_decode
    )


def cmd_sweep(args) -> int:
    from codesign.cli._common import progress as _progress
    from codesign.config import default_workload
    from codesign.explore.sweep import parse_vary, plot_sweep, run_sweep, write_outputs
    from codesign.hardware import load_hardware
    from codesign.model_io import load_model_config
    from codesign.units import fmt_knob

    check_output_paths(args.plot)
    cfg = load_model_config(args.model)
    hw = load_hardware(args.hardware, devices=args.devices, slices=args.slices)
    w = dataclasses.replace(
        default_workload(cfg, args.devices, args.global_batch, args.seq_len),
        mode=args.workload,
        matmul_dtype=args.matmul_dtype,
    )
    with _progress() as update:
        result = run_sweep(
            cfg,
            hw,
            w,
            args.devices,
            parse_vary(args.vary),
            verify=args.verify,
            target=args.target,
            progress=update,
        )
    files = write_outputs(result, args.out) if args.out else []
    if args.plot:
        plot_sweep(result, args.plot, metric=args.metric)
        files.append(args.plot)
    doc = result.to_json()
    if args.json:
        print_json(doc)
        return 0
    from rich.table import Table

    knobs = list(result.points[0]["knobs"]) if result.points else []
    t = Table(title=f"sweep: {cfg.name} on {args.devices}× {hw.name}")
    for col in knobs + ["best layout", "step time", "MFU", "fits", "recompiled", "reason"]:
        t.add_column(col, no_wrap=col == "best layout")  # a layout is copied whole into --strategy
    for p in result.points:
        t.add_row(
            *[fmt_knob(p["knobs"][k]) for k in knobs],
            p["best_spec"] or "-",
            f"{p['step_time_s']:.3g} s" if p["step_time_s"] else "-",
            f"{p['mfu']:.1%}" if p["mfu"] else "-",
            fmt_knob(p["fits"]),
            fmt_knob(p["recompiled"]),
            (p.get("reason") or "")[:60],
        )
    print_wide(t)
    out = console()
    out.print(
        f"{len(result.points)} points in {result.wall_s:.1f} s; re-costing saved "
        f"{result.recost_saved_s:.1f} s of compiles" + (f"; wrote {', '.join(files)}" if files else "")
    )
    return 0


def cmd_calibrate(args) -> int:
    from codesign.calibrate import cpu_warning, render_calibration, run_calibration

    check_output_paths(args.out)  # before the benchmarks, not after
    result = run_calibration(args.out, quick=args.quick)
    if args.json and cpu_warning(result):  # the table shows it; with --json stdout holds only the document
        print(cpu_warning(result), file=sys.stderr)
    return _print(args, result, render_calibration)


def register(add) -> None:
    sp = add("explore", None, "co-design analyses: kv-cache, flops, ep-tpot, decode, sweep")
    sub = sp.add_subparsers(dest="analysis", required=True)

    def sub_add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.set_defaults(fn=fn)
        return p

    p = sub_add("kv-cache", cmd_kv_cache, "KV cache bytes per token (MLA vs GQA vs MHA)")
    p.add_argument("--models", default="deepseek-v3,qwen2.5-72b,llama3.1-405b")
    p.add_argument("--dtype", default="bf16")

    p = sub_add("flops", cmd_flops, "training FLOPs per token, analytic and compiled")
    p.add_argument("--models", default="deepseek-v2,deepseek-v3,qwen2.5-72b,llama3.1-405b")
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--no-compile", action="store_true", help="analytic column only")

    p = sub_add("ep-tpot", cmd_ep_tpot, "decode TPOT bound from expert-parallel all-to-all")
    p.add_argument("--model", default="deepseek-v3")
    p.add_argument("--hardware", default="h800,gb200-nvl72")
    p.add_argument("--tokens-per-device", dest="tokens_per_device", type=positive_int)
    p.add_argument(
        "--dispatch-bytes", dest="dispatch_bytes", type=positive_float, help="bytes/element (FP8 = 1)"
    )
    p.add_argument(
        "--combine-bytes", dest="combine_bytes", type=positive_float, help="bytes/element (BF16 = 2)"
    )
    p.add_argument(
        "--hidden", type=positive_int, help="hidden size (default: the model's; the paper rounds to 7000)"
    )
    p.add_argument("--experts-per-token", dest="experts_per_token", type=positive_int, help="routed + shared")
    p.add_argument("--layers", type=positive_int)
    p.add_argument("--all-to-alls-per-layer", dest="all_to_alls_per_layer", type=positive_int)
    p.add_argument("--ep-devices", dest="ep_devices", type=positive_int)
    p.add_argument("--level", help="force a network level by name")
    p.add_argument(
        "--bytes-per-s", dest="bytes_per_s", type=positive_float, help="override per-GPU bandwidth"
    )
    p.add_argument("--latency-s", dest="latency_s", type=nonneg_float, help="override per-collective latency")

    p = sub_add("decode", cmd_decode, "memory-bound decode throughput per GPU vs context (MLA/GQA/MHA)")
    p.add_argument("--model", default="deepseek-v3")
    p.add_argument("--hardware", default="h800")
    p.add_argument("--devices", type=positive_int, default=32)
    p.add_argument(
        "--contexts", type=int_list, default="1024,4096,16384,65536,131072", help="context lengths"
    )

    p = sub_add("sweep", cmd_sweep, "vary hardware/model knobs and re-plan at each point")
    p.add_argument("--model", required=True)
    p.add_argument("--hardware", required=True)
    p.add_argument("--devices", type=positive_int, required=True)
    add_slices_arg(p)
    p.add_argument("--global-batch", type=positive_int)
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--workload", default="train", choices=("train", "decode"))
    p.add_argument("--vary", action="append", default=[], help="knob=v1,v2,… (repeatable; see README)")
    p.add_argument("--verify", action="store_true", help="compile-verify each point's top candidates")
    p.add_argument("--target", default="auto", choices=("auto", "cpu", "tpu", "gpu"))
    p.add_argument("--metric", default="mfu", choices=("mfu", "step_time_s"))
    p.add_argument("--out", help="output prefix: writes PREFIX.json and PREFIX.csv")
    p.add_argument("--plot", help="PNG: a line chart (one knob) or heatmap (two knobs)")
    add_matmul_dtype_arg(p)

    sp = add("calibrate", cmd_calibrate, "microbenchmark the attached devices; write a hardware profile")
    sp.add_argument("--out", help="YAML profile to write (accepted by --hardware)")
    sp.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    sp.set_defaults(use_accelerator=True)

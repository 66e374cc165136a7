"""Argument definitions and thin handlers for plan / compile / explore / calibrate (+ train, validate)."""

from __future__ import annotations

import dataclasses

from codesign.cli import console, print_json


def _progress():
    """A rich progress bar on stderr, driven by (label, done, total) callbacks."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = prog.add_task(label, total=total)
        prog.update(tasks[label], completed=done, total=total)

    return prog, update


def _common_model_hw(sp) -> None:
    sp.add_argument("--model", required=True, help="preset name, YAML ModelConfig, or HF config.json")
    sp.add_argument("--hardware", required=True, help="catalog name (see `codesign hardware`) or YAML profile")
    sp.add_argument("--devices", type=int, required=True, help="device count N")
    sp.add_argument("--global-batch", type=int, help="sequences per step (default: 4 per device)")
    sp.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096)")
    sp.add_argument("--target", default="auto", choices=("auto", "analytic", "cpu", "tpu", "gpu", "attached"))
    sp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="master-weight dtype (compute is bf16)")
    sp.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                    help="attention kernel to cost and compile (cudnn: fused flash attention on NVIDIA GPUs)")


def _resolve(args):
    from codesign.hardware import load_hardware
    from codesign.model_io import load_model_config
    from codesign.planner import default_workload

    cfg = load_model_config(args.model)
    hw = load_hardware(args.hardware, devices=args.devices)
    if args.devices < 1:
        from codesign.cli import UsageError

        raise UsageError(f"--devices must be positive, got {args.devices}")
    w = default_workload(cfg, args.devices, args.global_batch, args.seq_len)
    return cfg, hw, dataclasses.replace(w, param_dtype=args.param_dtype, attention=args.attention)


def cmd_plan(args) -> int:
    from codesign.planner import PlanRequest, plan
    from codesign.planner.constraints import parse_constraints, parse_fix
    from codesign.planner.export_maxtext import maxtext_export
    from codesign.planner.render import plan_table, plot_pareto, search_summary

    cfg, hw, w = _resolve(args)
    req = PlanRequest(cfg=cfg, hardware=hw, workload=w, n_devices=args.devices, target=args.target,
                      top_k=args.compile_top, timeout_s=args.timeout, exhaustive=args.exhaustive,
                      constraints=parse_constraints(args.strategy_filter) + parse_fix(args.fix),
                      headroom=args.headroom, max_compile_devices=args.max_compile_devices,
                      use_cache=not args.no_cache, cache_dir=args.cache_dir)
    if args.workers:
        req.workers = args.workers
    bar, update = _progress()
    req.progress = update
    with bar:
        result = plan(req)
    if args.top:
        result.candidates = result.candidates[: args.top]
        if result.chosen is not None and result.chosen >= args.top:
            result.chosen = None
    if args.out:
        result.save(args.out)
    if args.plot:
        plot_pareto(result, args.plot)
    export = maxtext_export(result, hw) if args.export == "maxtext" else None
    if args.json:
        doc = result.to_json()
        if export:
            doc["export"] = {"maxtext": export.overrides, "maxtext_notes": list(export.notes)}
        print_json(doc)
    else:
        out = console()
        out.print(plan_table(result, top=args.rows))
        out.print(search_summary(result))
        for line in result.explanation:
            out.print(line, markup=False)
        if export:
            out.print("MaxText overrides:\n" + export.to_text(), markup=False, soft_wrap=True)
        if args.out:
            out.print(f"plan written to {args.out}")
    return 0 if result.chosen is not None else 1


def cmd_compile(args) -> int:
    from codesign.compile.measure import measure_one
    from codesign.compile.worker import CompileRequest
    from codesign.cost.estimate import estimate_from_report
    from codesign.planner.plan_file import chosen_candidate, load_plan
    from codesign.sharding.strategy import Strategy

    cfg, hw, w = _resolve(args)
    if args.plan:
        spec = chosen_candidate(load_plan(args.plan))["strategy"]["spec"]
    elif args.strategy:
        spec = args.strategy
    else:
        from codesign.cli import UsageError

        raise UsageError("give --strategy SPEC or --plan FILE")
    strategy = Strategy.parse(spec)
    if strategy.n_devices != args.devices:
        from codesign.sharding.strategy import StrategyError

        raise StrategyError(f"strategy {strategy.spec} uses {strategy.n_devices} devices but --devices is "
                            f"{args.devices}; make the mesh sizes multiply to {args.devices}")
    report = measure_one(CompileRequest(cfg, w, strategy, hw, args.target, save_hlo=args.save_hlo),
                         timeout_s=args.timeout)
    est = estimate_from_report(cfg, w, strategy, hw, report)
    doc = {"strategy": strategy.to_json(), **est.to_json(), "report": report.to_json()}
    if args.json:
        print_json(doc)
    else:
        from codesign.compile.render import report_tables

        out = console()
        for item in report_tables(cfg, strategy, hw, report, est):
            out.print(item)
    return 0 if report.outcome in ("ok", "oom") else 1


def register(add) -> None:
    sp = add("plan", cmd_plan, "search layouts, verify the best with the compiler, write a plan")
    _common_model_hw(sp)
    sp.add_argument("--top", type=int, help="keep only the first K ranked candidates in the output")
    sp.add_argument("--rows", type=int, default=15, help="table rows to print (default 15)")
    sp.add_argument("--compile-top", type=int, default=4, help="candidates that fit to verify by compiling")
    sp.add_argument("--workers", type=int, help="parallel compile processes (default: CPU cores)")
    sp.add_argument("--timeout", type=float, default=600, help="per-candidate compile timeout, seconds")
    sp.add_argument("--strategy-filter", help='constraints, e.g. "tensor<=8,pipeline=1,remat!=none"')
    sp.add_argument("--fix", help='knobs already decided, e.g. "remat=full,tensor=8"')
    sp.add_argument("--headroom", type=float, default=0.0, help="extra fraction of HBM to keep free")
    sp.add_argument("--exhaustive", action="store_true", help="compile every valid candidate")
    sp.add_argument("--max-compile-devices", type=int, help="shrink pure data replicas above this mesh size")
    sp.add_argument("--out", help="write the plan JSON here")
    sp.add_argument("--plot", help="write a step-time vs memory PNG with the Pareto front")
    sp.add_argument("--export", choices=("maxtext",), help="print the chosen plan as MaxText overrides")
    sp.add_argument("--no-cache", action="store_true", help="ignore the on-disk compile cache")
    sp.add_argument("--cache-dir", help="compile cache directory (default ~/.cache/codesign/compile)")

    sp = add("compile", cmd_compile, "compile one candidate; print its CompileReport and Estimate")
    _common_model_hw(sp)
    sp.add_argument("--strategy", help="strategy spec, e.g. fsdp=8,tensor=4,remat=full")
    sp.add_argument("--plan", help="take the chosen strategy of this plan file")
    sp.add_argument("--timeout", type=float, default=900)
    sp.add_argument("--save-hlo", help="write the optimized HLO text here")

    for module in ("codesign.cli_train", "codesign.cli_explore"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as e:
            if e.name != module:
                raise
            continue
        mod.register(add)

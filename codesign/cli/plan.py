"""`codesign plan`: search layouts, verify the best with the compiler, write and show the plan."""

from __future__ import annotations

import sys

from codesign.cli._common import (
    add_matmul_dtype_arg,
    add_model_hw_args,
    check_output_paths,
    console,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
    print_json,
    print_wide,
    progress,
    resolve_model_hw,
    resolve_target,
)


def cmd_plan(args) -> int:
    from codesign.planner import PlanRequest, plan
    from codesign.planner.constraints import parse_constraints, parse_fix
    from codesign.planner.export_maxtext import maxtext_export
    from codesign.planner.render import plan_table, plot_pareto, search_summary

    cfg, hw, w = resolve_model_hw(args)
    resolve_target(args, hw)  # fail fast: cuDNN without a GPU target, a conflicting XLA_FLAGS device count
    check_output_paths(args.out, args.plot)  # not after minutes of compiling
    req = PlanRequest(
        cfg=cfg,
        hardware=hw,
        workload=w,
        n_devices=args.devices,
        target=args.target,
        top_k=args.compile_top,
        timeout_s=args.timeout,
        exhaustive=args.exhaustive,
        constraints=parse_constraints(args.strategy_filter) + parse_fix(args.fix),
        headroom=args.headroom,
        max_compile_devices=args.max_compile_devices,
        use_cache=not args.no_cache,
        cache_dir=args.cache_dir,
        executor=args.executor,
    )
    if args.executor == "ray":  # fail fast, before the analytic search, when Ray is not installed
        from codesign.compile.measure import make_executor

        make_executor("ray", 1)
    if args.workers:
        req.workers = args.workers
    with progress() as update:
        req.progress = update
        result = plan(req)
    if args.top:
        result.candidates = result.candidates[: args.top]
        if result.chosen is not None and result.chosen >= args.top:
            result.chosen = None
    if args.out:
        result.save(args.out)
    if args.plot:
        plot_pareto(result, args.plot)
    if args.export and result.best is None:  # nothing to export; the exit status (1) already says no fit
        print(f"note: no candidate fits, so --export {args.export} has nothing to export", file=sys.stderr)
        args.export = None
    export = maxtext_export(result, hw) if args.export == "maxtext" else None
    if args.json:
        doc = result.to_json()
        if export:
            doc["export"] = {"maxtext": export.overrides, "maxtext_notes": list(export.notes)}
        print_json(doc)
    else:
        out = console()
        print_wide(plan_table(result, top=args.rows))
        out.print(search_summary(result))
        for line in result.explanation:
            out.print(line, markup=False)
        if export:
            out.print("MaxText overrides:\n" + export.to_text(), markup=False, soft_wrap=True)
        if args.out:
            out.print(f"plan written to {args.out}")
    return 0 if result.chosen is not None else 1


def register(add) -> None:
    sp = add("plan", cmd_plan, "search layouts, verify the best with the compiler, write a plan")
    add_model_hw_args(sp)
    add_matmul_dtype_arg(sp)
    sp.add_argument("--top", type=positive_int, help="keep only the first K ranked candidates in the output")
    sp.add_argument("--rows", type=positive_int, default=15, help="table rows to print (default 15)")
    sp.add_argument(
        "--compile-top", type=nonneg_int, default=4, help="candidates that fit to verify by compiling"
    )
    sp.add_argument("--workers", type=positive_int, help="parallel compile processes (default: CPU cores)")
    sp.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where compiles run: local worker processes, or tasks on a Ray cluster (RAY_ADDRESS; "
        'pip install -e ".[ray]")',
    )
    sp.add_argument(
        "--timeout", type=positive_float, default=600, help="per-candidate compile timeout, seconds"
    )
    sp.add_argument("--strategy-filter", help='constraints, e.g. "tensor<=8,pipeline=1,remat!=none"')
    sp.add_argument("--fix", help='knobs already decided, e.g. "remat=full,tensor=8"')
    sp.add_argument("--headroom", type=fraction, default=0.0, help="extra fraction of HBM to keep free")
    sp.add_argument("--exhaustive", action="store_true", help="compile every valid candidate")
    sp.add_argument(
        "--max-compile-devices", type=positive_int, help="shrink pure data replicas above this mesh size"
    )
    sp.add_argument("--out", help="write the plan JSON here")
    sp.add_argument("--plot", help="write a step-time vs memory PNG with the Pareto front")
    sp.add_argument("--export", choices=("maxtext",), help="print the chosen plan as MaxText overrides")
    sp.add_argument("--no-cache", action="store_true", help="ignore the on-disk compile cache")
    sp.add_argument("--cache-dir", help="compile cache directory (default ~/.cache/codesign/compile)")

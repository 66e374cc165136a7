"""`codesign compile`: compile one candidate and print its CompileReport and Estimate."""

from __future__ import annotations

from codesign.cli._common import (
    UsageError,
    add_matmul_dtype_arg,
    add_model_hw_args,
    check_output_paths,
    console,
    positive_float,
    print_json,
    resolve_model_hw,
    resolve_target,
)


def cmd_compile(args) -> int:
    from codesign.compile.flags import parse_flags
    from codesign.compile.measure import measure_one
    from codesign.compile.worker import CompileRequest
    from codesign.cost.estimate import estimate_from_report
    from codesign.plan_file import chosen_candidate, load_plan
    from codesign.sharding.strategy import Strategy, StrategyError

    cfg, hw, w = resolve_model_hw(args)
    if args.plan:
        spec = chosen_candidate(load_plan(args.plan))["strategy"]["spec"]
    elif args.strategy:
        spec = args.strategy
    else:
        raise UsageError("give --strategy SPEC or --plan FILE")
    strategy = Strategy.parse(spec)
    if strategy.n_devices != args.devices:
        raise StrategyError(
            f"strategy {strategy.spec} uses {strategy.n_devices} devices but --devices is "
            f"{args.devices}; make the mesh sizes multiply to {args.devices}"
        )
    target = resolve_target(args, hw)
    if args.save_hlo and target == "analytic":
        raise UsageError(
            "--save-hlo needs a compiler target; the analytic target compiles nothing (use --target cpu)"
        )
    check_output_paths(args.save_hlo)
    if strategy.rules_file:  # a broken rules= file is one line here, not an error inside the compile worker
        from codesign.sharding.rules import default_rules

        default_rules(strategy)
    flags = parse_flags(args.xla_flag) if args.xla_flag else None
    report = measure_one(
        CompileRequest(cfg, w, strategy, hw, target, save_hlo=args.save_hlo, xla_flags=flags),
        timeout_s=args.timeout,
    )
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
    sp = add("compile", cmd_compile, "compile one candidate; print its CompileReport and Estimate")
    add_model_hw_args(sp)
    add_matmul_dtype_arg(sp)
    sp.add_argument("--strategy", help="strategy spec, e.g. fsdp=8,tensor=4,remat=full")
    sp.add_argument("--plan", help="take the chosen strategy of this plan file")
    sp.add_argument("--timeout", type=positive_float, default=900, help="compile timeout, seconds")
    sp.add_argument("--save-hlo", help="write the optimized HLO text here")
    sp.add_argument(
        "--xla-flag",
        action="append",
        metavar="NAME=VALUE",
        help="override one of the target's XLA overlap flags (repeatable; NAME= removes a default), "
        "e.g. xla_tpu_enable_windowed_einsum_for_all_gather=true",
    )

"""A CompileReport as readable tables: outcome, per-device work, memory, collectives by kind and axis."""

from __future__ import annotations

from collections import defaultdict

from codesign.units import fmt_bytes as _gb


def report_tables(cfg, strategy, hardware, report, estimate) -> list:
    from rich.table import Table

    head = Table(
        title=f"{cfg.name} · {strategy.spec} · {hardware.name} · target {report.target}", show_header=False
    )
    head.add_column("field")
    head.add_column("value", overflow="fold")
    head.add_row(
        "outcome", report.outcome + (f" ({report.stage}): {report.message[:300]}" if report.message else "")
    )
    head.add_row("compile time", f"{report.compile_s:.1f} s, HLO {report.hlo_bytes / 1e6:.1f} MB")
    head.add_row("FLOPs / device (loop-aware)", f"{report.flops:.4g} (matmul {report.matmul_flops:.4g})")
    xla = report.xla_cost_analysis or {}
    if xla.get("flops") is not None:
        head.add_row("XLA cost_analysis FLOPs", f"{xla['flops']:.4g} (counts loop bodies once)")
    head.add_row("bytes accessed / device", f"{report.bytes_accessed:.4g}")
    if report.memory:
        m = report.memory
        head.add_row(
            "memory / device",
            f"args {_gb(m.argument)}, out {_gb(m.output)}, alias {_gb(m.alias)}, "
            f"temp {_gb(m.temp)}, peak {_gb(m.peak)} of {_gb(m.capacity)}",
        )
    if report.outcome == "oom":
        head.add_row(
            "out of memory", f"needs {_gb(report.oom_required_bytes)} > {_gb(report.oom_available_bytes)}"
        )
    if report.xla_flags:
        head.add_row("XLA flags", " ".join(f"--{k}={v}" for k, v in sorted(report.xla_flags.items())))
    for note in report.notes:
        head.add_row("note", note)
    est = Table(title="estimate")
    for col in (
        "step time",
        "tokens/s",
        "MFU",
        "memory/device",
        "fits",
        "compute",
        "exposed comm",
        "evidence",
    ):
        est.add_column(col)
    b = estimate.breakdown
    est.add_row(
        f"{estimate.step_time_s:.4g} s",
        f"{estimate.tokens_per_s:,.0f}",
        f"{estimate.mfu:.1%}",
        _gb(estimate.memory_per_device_bytes),
        "yes" if estimate.fits else "no",
        f"{b.get('compute_s', 0):.4g} s",
        f"{b.get('exposed_collective_s', 0):.4g} s",
        estimate.evidence,
    )
    coll = Table(title="collectives per step (per device)")
    for col in ("kind", "mesh axes", "group", "count", "async", "bytes each", "bytes total", "hidden"):
        coll.add_column(col)
    groups: dict[tuple, list] = defaultdict(list)
    for c in report.collectives:
        groups[(c.kind, c.mesh_axes, c.group_size)].append(c)
    for (kind, axes, group), cs in sorted(
        groups.items(), key=lambda kv: -sum(c.bytes * c.count for c in kv[1])
    ):
        count = sum(c.count for c in cs)
        total = sum(c.bytes * c.count for c in cs)
        hidden = estimate.overlap.get(f"{'/'.join(axes)} {kind}")
        coll.add_row(
            kind,
            ",".join(axes) or "-",
            str(group),
            str(count),
            str(sum(c.async_count for c in cs)),
            f"{total / count / 1e6:.2f} MB",
            f"{total / 1e6:.1f} MB",
            f"{hidden['hidden']:.0%} ({hidden['source']})" if hidden else "-",
        )
    return [head, est, coll] + [f"  {r}" for r in estimate.reasons]

"""Compile one candidate (model x workload x strategy) for a target and read back a `CompileReport`.

The targets and the devices each compiles for: :mod:`codesign.compile.devices`.

What gets compiled can differ from the candidate, and the report says so (notes, ``mesh``,
``full_mesh``, ``data_scale``, ``pipeline_stages``):

* pipeline=p > 1: the WHOLE pipelined step (``codesign.pipeline``: every stage, the tick loop with its
  fill and drain, the collective-permutes between stages, the stored activations of the microbatches in
  flight) on the full mesh, pipeline axis included; ``pipeline_stages`` says so.
* a mesh larger than ``max_compile_devices`` (default 512 on cpu/attached, unlimited on tpu/gpu except
  that a TPU compile needs a device count the hardware's slices can hold): the ``data`` axis (pure
  replicas) and the global batch are divided by the same factor (never the pipeline stages).
  Per-device compute, memory and every non-data collective are unchanged;
  the cost model scales the data-axis group sizes back up by ``data_scale``.

`compile_candidate` never raises for a candidate's failure: it returns outcome ``error`` (with the
stage: build / lower / compile / analyze) or ``oom`` with the byte counts parsed from the compiler.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import traceback
from dataclasses import dataclass
from importlib import metadata

from codesign import _compat
from codesign.arithmetic import pipeline_ticks
from codesign.closed_form import analytic_report
from codesign.compile.devices import target_devices, valid_tpu_count
from codesign.compile.flags import Flags, platform_of, refused_flags, resolve_flags
from codesign.compile.target_names import (  # noqa: F401  (re-exported: the names callers import from here)
    TARGETS,
    TargetError,
    gpu_aot_available,
    libtpu_available,
    resolve_target,
    unknown_target,
)
from codesign.config import ModelConfig, Workload
from codesign.hardware.catalog import Hardware
from codesign.report import CompileReport, MemoryStats
from codesign.sharding.strategy import Strategy

DEFAULT_MAX_COMPILE_DEVICES = {"cpu": 512, "attached": 512}


def versions() -> dict[str, str]:
    """Versions of the compiler stack (read from package metadata, nothing imported)."""
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------------- what to compile


@dataclass(frozen=True)
class CompilePlan:
    """What is actually compiled for a candidate (the data axis possibly reduced)."""

    cfg: ModelConfig
    workload: Workload
    strategy: Strategy  # the candidate's, data axis possibly reduced
    full_mesh: tuple[tuple[str, int], ...]
    pipeline_stages: int = 1
    data_scale: int = 1
    notes: tuple[str, ...] = ()

    @property
    def n_devices(self) -> int:
        return self.strategy.n_devices


def plan_compile(
    cfg: ModelConfig,
    workload: Workload,
    strategy: Strategy,
    target: str,
    hardware: Hardware | None = None,
    max_compile_devices: int | None = None,
) -> CompilePlan:
    """Pure bookkeeping (no JAX): the (possibly data-reduced) candidate to compile. Raises TargetError when
    the mesh cannot be brought under `max_compile_devices` by shrinking the data axis."""
    notes: list[str] = []
    full_mesh = strategy.mesh
    p = strategy.size("pipeline")
    if p > 1:
        v, m = strategy.stages_per_device, strategy.microbatches
        order = (
            "in 1F1B order (codesign.pipeline_1f1b)"
            if strategy.schedule in ("1f1b", "interleaved")
            else "as all forward ticks, then all backward ticks (GPipe order, codesign.pipeline)"
        )
        notes.append(
            f"pipeline: compiled the whole pipelined step ({p} stages x {v} chunks, {m} microbatches: "
            f"{pipeline_ticks(m, p, v)} ticks of which {p - 1} fill/drain, schedule {strategy.schedule} "
            f"executed {order})"
        )
    limit = (
        max_compile_devices if max_compile_devices is not None else DEFAULT_MAX_COMPILE_DEVICES.get(target)
    )
    need_slice = target == "tpu" and hardware is not None and hardware.tpu_generation
    n, data = strategy.n_devices, strategy.size("data")

    def ok(count: int) -> bool:
        return (limit is None or count <= limit) and (not need_slice or valid_tpu_count(hardware, count))

    scale = 1
    if not ok(n):
        for f in range(2, data + 1):
            if data % f == 0 and ok(n // f):
                scale = f
                break
        else:
            why = (
                f"max_compile_devices={limit}"
                if limit is not None and n > limit
                else f"a {hardware.tpu_generation} slice shape"
                if need_slice
                else "the limit"
            )
            raise TargetError(
                f"cannot compile {strategy.spec} on {n} devices for target {target}: {why}, and shrinking the "
                f"data axis (size {data}) does not help; raise max_compile_devices or use more data parallelism"
            )
    if scale > 1:
        strategy = strategy.replace(sizes={**strategy.sizes, "data": data // scale})
        workload = dataclasses.replace(workload, global_batch=workload.global_batch // scale)
        full = ",".join(f"{a}={s}" for a, s in full_mesh if s > 1)
        notes.append(
            f"reduced-mesh: data_scale={scale} full_mesh={full} compiled_data={data // scale} "
            f"full_global_batch={workload.global_batch * scale} (data-axis groups scale back by {scale})"
        )
    return CompilePlan(
        cfg=cfg,
        workload=workload,
        strategy=strategy,
        full_mesh=full_mesh,
        pipeline_stages=p,
        data_scale=scale,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------- OOM parsing

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_OOM_PATTERNS = (
    # libtpu 0.0.52: "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total
    # memory required for HLO temporaries (23.61G) exceeds available HBM (15.75G). HLO module: jit__step."
    re.compile(r"\(" + _SIZE + r"\)\s*exceeds available (?:HBM|memory)\s*\(" + _SIZE + r"\)", re.IGNORECASE),
    # older TPU/GPU runtimes: "Ran out of memory in memory space hbm. Used 20.25G of 15.48G hbm."
    re.compile(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE, re.IGNORECASE),
)
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "CompileTimeHbmOom", "Ran out of memory", "out of memory")


def _bytes(num: str, unit: str) -> int:
    return round(float(num) * _UNITS[unit.upper()])


def parse_oom(message: str) -> tuple[int, int] | None:
    """(required, available) bytes from a compiler out-of-memory message; (0, 0) when it is an OOM
    without numbers; None when it is not an OOM. Sizes like ``23.61G`` are GiB (XLA prints base 1024)."""
    if not any(m.lower() in message.lower() for m in _OOM_MARKERS):
        return None
    for pat in _OOM_PATTERNS:
        m = pat.search(message)
        if m:
            return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
    return (
        (0, 0)
        if ("RESOURCE_EXHAUSTED" in message and "memory" in message.lower()) or "CompileTimeHbmOom" in message
        else None
    )


# ---------------------------------------------------------------------------------------------- compile


def _memory(compiled, capacity: int) -> MemoryStats | None:
    m = _compat.first_executable(compiled.memory_analysis())
    if m is None:
        return None
    arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    code = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
    return MemoryStats(
        argument=arg,
        output=out,
        alias=alias,
        temp=temp,
        code=code,
        peak=arg + out - alias + temp,
        capacity=int(capacity),
    )


def _flops_notes(stats, xla: dict | None) -> list[str]:
    """Say how XLA's flat flops relate to the loop-aware count (XLA counts a loop body once)."""
    if not xla or not xla.get("flops") or not stats.flops:
        return []
    ratio = stats.flops / xla["flops"]
    trips = [n for _, n, _ in stats.while_loops]
    bound = math.prod(max(1, n) for n in trips) if trips else 1
    desc = f"XLA cost_analysis flops {xla['flops']:.4g} vs loop-aware {stats.flops:.4g} (x{ratio:.3g})"
    if trips:
        desc += f"; while-loop trip counts {trips} (XLA counts a loop body once)"
    if ratio < 0.9 or ratio > 1.1 * bound:
        return [desc + "; NOT explained by the loop trip counts"]
    return [desc]


def _error(stage: str, exc: BaseException | str, **kw) -> CompileReport:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return CompileReport(outcome="error", stage=stage, message=msg.strip()[:4000], versions=versions(), **kw)


def _memory_only_report(
    compiled,
    hardware: Hardware,
    target: str,
    compile_s: float,
    exc: BaseException,
    notes: list[str],
    base: dict,
) -> CompileReport:
    """A compile whose HLO text cannot be read back: memory analysis only; the cost model times it."""
    from codesign._compat import normalize_cost_analysis

    try:
        xla = normalize_cost_analysis(compiled.cost_analysis())
    except Exception:  # noqa: BLE001
        xla = None
    memory = _memory(compiled, hardware.memory_capacity_bytes)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    notes = list(notes) + [
        (
            f"hlo-unavailable: {type(exc).__name__}: {first}; FLOPs and collectives not read "
            "from the HLO (the cost model times this candidate analytically)"
        )
    ]
    if memory and memory.capacity and memory.peak > memory.capacity:
        notes.append(
            f"peak memory {memory.peak / 2**30:.2f} GiB exceeds capacity {memory.capacity / 2**30:.2f} GiB"
        )
    return CompileReport(
        outcome="ok",
        compile_s=compile_s,
        xla_cost_analysis=xla,
        memory=memory,
        hlo_analyzed=False,
        notes=tuple(notes),
        versions=versions(),
        **base,
    )


def compile_candidate(
    cfg: ModelConfig,
    workload: Workload,
    strategy: Strategy,
    hardware: Hardware,
    target: str = "auto",
    *,
    save_hlo: str | None = None,
    max_compile_devices: int | None = None,
    xla_flags: Flags | None = None,
) -> CompileReport:
    """Compile one candidate's train step in this process and report what the compiler produced.

    `xla_flags` overrides the target's overlap flags (`codesign.compile.flags.resolve_flags`).
    Never raises for the candidate: failures are `error` (with stage) or `oom` reports.
    """
    try:
        target = resolve_target(target, hardware)
    except TargetError as e:
        return _error("build", e, target=str(target))
    t_start = time.perf_counter()
    if target == "analytic":
        report = analytic_report(cfg, workload, strategy, platform=hardware.platform)
        return dataclasses.replace(
            report,
            compile_s=time.perf_counter() - t_start,
            full_mesh=strategy.mesh,
            pipeline_stages=strategy.size("pipeline"),
            versions=versions(),
        )
    try:
        plan = plan_compile(cfg, workload, strategy, target, hardware, max_compile_devices)
    except (TargetError, ValueError) as e:
        return _error("build", e, target=target, full_mesh=strategy.mesh)
    flags = dict(resolve_flags(target, hardware.platform, xla_flags, hardware.tpu_generation))
    base = {
        "target": target,
        "xla_flags": flags,  # what the compile applied (rejected flags are dropped below)
        "mesh": plan.strategy.mesh,
        "full_mesh": plan.full_mesh,
        "pipeline_stages": plan.pipeline_stages,
        "data_scale": plan.data_scale,
    }
    notes = list(plan.notes)
    try:
        from codesign.models.attention import REFERENCE_NOTE
        from codesign.sharding.mesh import MeshSpec
        from codesign.train_step import TrainProgram

        spec = MeshSpec.from_strategy(plan.strategy)
        devices = target_devices(target, hardware, spec.size)
        # Deviceless TPU slices keep the id order the cost model places axes by (see codesign.compile.devices).
        mesh = spec.build(devices, hybrid=target != "tpu")
        prog = TrainProgram(plan.cfg, plan.workload, plan.strategy, mesh)
        if prog.attention_impl == "reference":  # the CPU's flash path: its cost is not a kernel's
            notes.append(REFERENCE_NOTE)
        state, batch = prog.abstract_state, prog.abstract_batch
        step = prog.step_fn
    except Exception as e:  # noqa: BLE001 - a candidate's failure is data, not an exception
        return _error("build", e, notes=tuple(notes), **base)
    try:
        lowered = step.lower(state, batch)
    except Exception as e:  # noqa: BLE001
        return _error("lower", e, notes=tuple(notes), **base)
    try:
        compiled = _compile_with_flags(lowered, flags, notes)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".strip()
        oom = parse_oom(msg)
        if oom is not None:
            return CompileReport(
                outcome="oom",
                message=msg[:4000],
                stage="compile",
                compile_s=time.perf_counter() - t_start,
                oom_required_bytes=oom[0],
                oom_available_bytes=oom[1],
                notes=tuple(notes),
                versions=versions(),
                memory=MemoryStats(capacity=hardware.memory_capacity_bytes),
                **base,
            )
        return _error("compile", e, compile_s=time.perf_counter() - t_start, notes=tuple(notes), **base)
    compile_s = time.perf_counter() - t_start
    try:
        from codesign._compat import normalize_cost_analysis
        from codesign.compile.hlo import analyze_hlo

        try:
            text, route = _compat.compiled_hlo_text(compiled)
        except Exception as e:  # noqa: BLE001
            # Seen with libtpu 0.0.52 on 70B-class steps: the compile succeeds, but turning the TPU
            # executable back into HLO text fails a RET_CHECK ("async-update instruction should have
            # 1 operands but sees 3"). The compiler's memory analysis still holds, so keep it.
            return _memory_only_report(compiled, hardware, target, compile_s, e, notes, base)
        if route != "as_text":
            notes.append(f"HLO text read through {route} (compiled.as_text() failed)")
        if save_hlo:
            os.makedirs(os.path.dirname(os.path.abspath(save_hlo)), exist_ok=True)
            with open(save_hlo, "w") as f:
                f.write(text)
        from codesign.sharding.mesh import slice_count

        stats = analyze_hlo(
            text,
            list(plan.strategy.mesh),
            [d.id for d in mesh.devices.flat],
            multislice=slice_count(list(mesh.devices.flat)) > 1,
        )
        try:
            raw = compiled.cost_analysis()
        except Exception as e:  # noqa: BLE001 - some backends do not implement it
            raw = None
            notes.append(f"cost_analysis unavailable: {type(e).__name__}: {e}")
        xla = normalize_cost_analysis(raw)
        memory = _memory(compiled, hardware.memory_capacity_bytes)
        notes += _flops_notes(stats, xla)
        if stats.skipped:
            notes.append(
                f"HLO walk skipped {stats.skipped} lines/instructions "
                f"({', '.join(stats.skipped_instructions[:3]) or 'unparsed lines'})"
            )
        if memory and memory.capacity and memory.peak > memory.capacity:
            notes.append(
                f"peak memory {memory.peak / 2**30:.2f} GiB exceeds capacity "
                f"{memory.capacity / 2**30:.2f} GiB (the {target} compiler did not reject it)"
            )
        if target == "cpu":
            notes.append("memory figures are the CPU compiler's, not the target accelerator's")
        if prog.dropped_rules:
            notes.append("replicated (rule dropped): " + "; ".join(str(d) for d in prog.dropped_rules[:8]))
    except Exception as e:  # noqa: BLE001
        return _error(
            "analyze",
            f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}",
            compile_s=compile_s,
            notes=tuple(notes),
            **base,
        )
    return CompileReport(
        outcome="ok",
        compile_s=compile_s,
        **stats.report_counts(),
        xla_cost_analysis=xla,
        memory=memory,
        hlo_bytes=stats.hlo_bytes,
        while_loops=stats.while_loops,
        notes=tuple(notes),
        versions=versions(),
        skipped_instructions=stats.skipped,
        skipped_examples=stats.skipped_instructions[:8],
        closed_form_collective_ratio=_closed_form_ratio(plan, target, stats.collectives),
        overlap_from_schedule=stats.scheduled and platform_of(target, hardware.platform) in ("tpu", "gpu"),
        **base,
    )


def _compile_with_flags(lowered, flags: dict[str, str], notes: list[str]):
    """`lowered.compile` with the target's flags; flags this compiler refuses (an unknown option, or an
    error that names them) are dropped from `flags` (in place, so the report records what applied),
    named in `notes`, and the compile retried."""
    while True:
        try:
            return lowered.compile(compiler_options=dict(flags)) if flags else lowered.compile()
        except Exception as e:  # re-raised unless it refuses flags we passed
            msg = str(e).strip()
            bad = refused_flags(msg, flags)
            if not bad:
                raise
            for k in bad:
                del flags[k]
            first = msg.splitlines()[0][:160] if msg else type(e).__name__
            notes.append(f"xla flags {', '.join(bad)} refused by this compiler ({first}): dropped")


def _closed_form_ratio(plan: CompilePlan, target: str, collectives) -> float | None:
    """A CPU compile's collective bytes against the closed form's CPU lowering of the same program: the
    structure check that lets the cost model trust the closed form's accelerator collectives."""
    if target != "cpu" or plan.data_scale > 1 or plan.pipeline_stages > 1:
        # a reduced data axis changes group sizes the closed form does not see; a pipelined compile is
        # the whole step, the closed form one stage
        return None
    closed = analytic_report(plan.cfg, plan.workload, plan.strategy, platform="cpu")
    want = sum(c.bytes * c.count for c in closed.collectives)
    got = sum(c.bytes * c.count for c in collectives)
    return got / want if want > 0 else None

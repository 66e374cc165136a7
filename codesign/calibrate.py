"""`codesign calibrate`: microbenchmarks on the attached devices, written as a hardware profile.

Measured (each: warm-up calls, then the median of several timed runs, every run ending in
`block_until_ready`):
- matmul FLOP/s of n x n x n products by size and dtype (`PLATFORM_DTYPES`: bf16 and fp32 at
  Precision.HIGHEST everywhere; on GPU also fp16 and fp8 e4m3 with bf16 output; a dtype the backend
  refuses is recorded as an error row). On an accelerator each timed run chains calls for >= 20 ms
  after >= 0.5 s of warm-up (clocks ramp).
- sustained matmul: the largest bf16 size again, each timed run chaining calls for >= 1 s (a train
  step keeps the chip busy for 0.1-1 s; power-limited clocks can drop below the short runs' rate).
  Its throughput over the table's at that size becomes `efficiency.sustained` (capped at 1).
- HBM streaming: y = x + 1 over a large f32 buffer; bytes = read + written.
- collectives over a 1D mesh of all devices (shard_map): all-gather, reduce-scatter, all-reduce,
  all-to-all. Bandwidth is reported in the convention of `codesign.cost.collectives` (per device, one
  direction): a ring all-gather of B bytes takes (n-1)/n B / bw, an all-reduce twice that.

The profile is the closest catalog system (by device kind: GPUs and TPU v4/v5e/v5p/v6e, see
`codesign.hardware.device_kind`) with its efficiency replaced, in the catalog's own shape: matmul =
{dtype: [[n, measured / the catalog chip's peak for that dtype], ...]}, hbm = measured / datasheet HBM,
collective = the cost model's all-gather time at efficiency 1 on the system's levels (NVLink switch, or
the slice's ICI torus rings on a TPU VM) over the measured time. `load_hardware(path)` reads it back;
the raw measurements ride along under `measurements` (ignored by the loader). The benchmarks are
injectable (`Bench`), so the profile writing is tested with a fake TPU on CPU.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from codesign import _compat
from codesign.cost.network import assign_levels, collective_time_on_axes
from codesign.hardware.catalog import Efficiency, Hardware, load_hardware
from codesign.hardware.device_kind import closest_system

_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32, "fp8": jnp.float8_e4m3fn}


def _time(
    fn: Callable[[], Any], reps: int, warmup_s: float = 0.0, min_run_s: float = 0.0, max_calls: int = 200
) -> float:
    """Median seconds per call over `reps` timed runs. Warm-up runs at least 2 calls and `warmup_s`
    (an idle GPU needs ~0.5 s of load before its clocks settle); each timed run chains enough calls to
    last `min_run_s`, so that dispatch and timer jitter stay small against it."""
    t0 = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - t0 < warmup_s:
        t = time.perf_counter()
        jax.block_until_ready(fn())
        one = time.perf_counter() - t
        calls += 1
    inner = max(1, min(max_calls, int(min_run_s / max(one, 1e-9))))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples)


def bench_matmul(
    n: int, dtype: str, reps: int, warmup_s: float = 0.0, min_run_s: float = 0.0, max_calls: int = 200
) -> float:
    """Seconds per n x n x n product."""
    key = jax.random.key(n)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(_DTYPES[dtype])
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(_DTYPES[dtype])
    out = jnp.bfloat16 if dtype == "fp8" else None
    # fp32 means full precision (the catalog's fp32 peak: no TF32 on GPU, 6 bf16 passes on TPU).
    prec = jax.lax.Precision.HIGHEST if dtype == "fp32" else None
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, precision=prec, preferred_element_type=out))
    return _time(lambda: f(a, b), reps, warmup_s, min_run_s, max_calls)


def bench_hbm(nbytes: int, reps: int, warmup_s: float = 0.0, min_run_s: float = 0.0) -> float:
    """Bytes per second read + written by an elementwise pass over an f32 buffer."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    return 2 * x.nbytes / _time(lambda: f(x), reps, warmup_s, min_run_s)


def bench_collectives(
    nbytes: int, reps: int, warmup_s: float = 0.0, min_run_s: float = 0.0
) -> list[dict[str, Any]]:
    devices = jax.devices()
    n = len(devices)
    mesh = _compat.make_mesh(devices, (n,), ("x",))
    elems = max(n * n, (nbytes // 4) // (n * n) * (n * n))  # divisible for the scatter and all-to-all
    full = jax.device_put(jnp.ones((elems,), jnp.float32), NamedSharding(mesh, P("x")))
    shard_bytes = elems * 4 // n
    # (kind, body, bytes in the collectives.py convention, ring factor on (n-1)/n B / bw). Every output
    # is declared per-device (P("x")): no replication check, and nothing is moved after the collective.
    cases = [
        ("all-gather", lambda x: jax.lax.all_gather(x, "x", tiled=True), elems * 4, 1.0),
        ("reduce-scatter", lambda x: jax.lax.psum_scatter(x, "x", tiled=True), shard_bytes, 1.0),
        ("all-reduce", lambda x: jax.lax.psum(x, "x"), shard_bytes, 2.0),
        ("all-to-all", lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True), shard_bytes, 1.0),
    ]
    rows = []
    for kind, body, b, factor in cases:
        try:
            f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
            t = _time(lambda f=f: f(full), reps, warmup_s, min_run_s)
        except Exception as e:  # noqa: BLE001 - a backend without this collective: record and go on
            rows.append({"kind": kind, "axis": "x", "devices": n, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append(
            {
                "kind": kind,
                "axis": "x",
                "devices": n,
                "bytes": int(b),
                "seconds": t,
                "bytes_per_s": factor * (n - 1) / n * b / t,
            }
        )
    return rows


@dataclass(frozen=True)
class Bench:
    """The devices calibrate measures and the microbenchmarks it runs on them (`attached_bench()`; tests
    pass a fake one, which is how the TPU and GPU paths are checked without the hardware).
    matmul(n, dtype, reps, warmup_s, min_run_s, max_calls) -> seconds per n^3 product;
    hbm(nbytes, reps, warmup_s, min_run_s) -> bytes/s; collectives(nbytes, reps, warmup_s, min_run_s) ->
    rows as `bench_collectives` returns them."""

    platform: str
    device_kind: str
    devices: int
    matmul: Callable[..., float] = bench_matmul
    hbm: Callable[..., float] = bench_hbm
    collectives: Callable[..., list[dict[str, Any]]] = bench_collectives


def attached_bench() -> Bench:
    devices = jax.devices()
    dev = devices[0]
    return Bench(dev.platform, getattr(dev, "device_kind", dev.platform), len(devices))


# Matmul dtypes per platform: the tensor-core / MXU input types the catalog has peaks for. fp16 runs on
# GPU tensor cores (TPUs have no fp16 MXU mode); fp8 is skipped on CPU (emulated) and TPU v4-v6e (no fp8).
PLATFORM_DTYPES = {"cpu": ("bf16", "fp32"), "gpu": ("bf16", "fp16", "fp32", "fp8"), "tpu": ("bf16", "fp32")}


def collective_efficiency(row: dict[str, Any], hardware: Hardware) -> float | None:
    """Measured over modelled bandwidth of one collective row: the model's time for the same kind, bytes
    and device group at efficiency 1 (`collective_time_on_axes` on the hardware's levels: a switch
    level's per-device bandwidth, or the ICI torus rings of the slice shape) over the measured time."""
    if "seconds" not in row or row["devices"] < 2:
        return None
    n = row["devices"]
    placements = assign_levels((("x", n),), hardware.with_devices(n))
    ideal = collective_time_on_axes(row["kind"], row["bytes"], ("x",), placements, efficiency=1.0)
    return ideal / row["seconds"]


def run_calibration(out_path: str | None, quick: bool = False, bench: Bench | None = None) -> dict[str, Any]:
    bench = bench or attached_bench()
    platform, kind, n_devices = bench.platform, bench.device_kind, bench.devices
    on_cpu = platform == "cpu"
    base = load_hardware(closest_system(kind, platform))
    if quick or on_cpu:
        sizes, reps, hbm_bytes, coll_bytes = (
            ((128, 256, 512) if quick else (256, 512, 1024)),
            3,
            1 << 24,
            1 << 20,
        )
        timing = {"warmup_s": 0.0, "min_run_s": 0.0}
    else:
        sizes, reps, hbm_bytes, coll_bytes = (1024, 2048, 4096, 8192), 7, 1 << 31, 1 << 28
        timing = {"warmup_s": 0.5, "min_run_s": 0.02}
    dtypes = PLATFORM_DTYPES.get(platform, ("bf16", "fp32"))
    t0 = time.perf_counter()

    matmul: list[dict[str, Any]] = []
    table: dict[str, list[list[float]]] = {}
    for dt in dtypes:
        peak = base.peak_flops.get(dt)
        for n in sizes:
            try:
                s = bench.matmul(n, dt, reps, **timing)
            except Exception as e:  # noqa: BLE001 - e.g. no fp8 on this backend
                matmul.append({"dtype": dt, "n": n, "error": f"{type(e).__name__}: {e}"[:200]})
                break
            flops = 2 * n**3 / s
            row = {"dtype": dt, "n": n, "seconds": s, "flops_per_s": flops}
            if peak:
                row["fraction"] = flops / peak
                table.setdefault(dt, []).append([n, round(flops / peak, 4)])
            matmul.append(row)
    sustained = None
    short = next((r for r in reversed(matmul) if r.get("dtype") == "bf16" and "seconds" in r), None)
    if short:
        n = short["n"]
        long_s = bench.matmul(
            n, "bf16", 3, timing["warmup_s"], 0.2 if (quick or on_cpu) else 1.0, max_calls=100_000
        )
        sustained = {
            "n": n,
            "seconds": long_s,
            "flops_per_s": 2 * n**3 / long_s,
            "relative_to_table": short["seconds"] / long_s,
        }
    hbm = bench.hbm(hbm_bytes, reps, **timing)
    colls = bench.collectives(coll_bytes, reps, **timing) if n_devices > 1 else []
    for r in colls:
        eff = collective_efficiency(r, base) if base.levels else None
        if eff is not None:
            r["efficiency"] = eff

    stamp = datetime.date.today().isoformat()
    source = f"measured by codesign calibrate on {kind}, {stamp}"
    gathers = [r["efficiency"] for r in colls if r.get("kind") == "all-gather" and "efficiency" in r]
    collective = gathers[0] if gathers else base.efficiency.collective
    if "bf16" not in table:  # the loader needs a bf16 table; keep the catalog's if bf16 failed
        table["bf16"] = [list(p) for p in base.efficiency.matmul["bf16"]]
    eff = Efficiency(
        matmul=table,
        hbm=hbm / base.chip.hbm_bytes_per_s,
        collective=collective,
        source=source + ("" if gathers else "; collective efficiency from the catalog (one device)"),
        sustained=min(1.0, sustained["relative_to_table"]) if sustained else 1.0,
    )
    hw = Hardware(
        name=f"{base.name}-measured",
        kind="system",
        chip=base.chip,
        efficiency=eff,
        devices=n_devices,
        levels=base.levels,
        sources={**dict(base.sources), "efficiency": source},
        tpu_generation=base.tpu_generation,
        memory_reserve_bytes=base.memory_reserve_bytes,
        description=f"{base.description} [{source}]",
    )
    if n_devices > 1:
        hw = hw.with_devices(n_devices)
    measurements = {
        "device_kind": kind,
        "platform": platform,
        "devices": n_devices,
        "matmul": matmul,
        "sustained_matmul": sustained,
        "hbm_bytes_per_s": hbm,
        "collectives": colls,
        "wall_s": time.perf_counter() - t0,
    }
    profile = {**hw.to_json(), "measurements": _plain(measurements)}
    if out_path:
        with open(out_path, "w") as f:
            yaml.safe_dump(profile, f, sort_keys=False)
    return {
        **_plain(measurements),
        "catalog_base": base.name,
        "source": source,
        "profile": profile,
        "out_path": out_path,
    }


def cpu_warning(result: dict[str, Any]) -> str | None:
    """The caveat a CPU measurement needs: its numbers describe the host, not any accelerator."""
    if result.get("platform") != "cpu":
        return None
    return (
        "warning: calibrate measured the host CPU (no GPU or TPU is attached, or JAX was pinned to the CPU); "
        "this profile describes this machine's CPU, not an accelerator - do not plan GPU/TPU runs with it"
    )


def render_calibration(result: dict[str, Any]):
    """`codesign calibrate` for people: what was measured, as fractions of the catalog's peaks."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from codesign.units import fmt_bytes, fmt_si

    parts: list[Any] = []
    warning = cpu_warning(result)
    if warning:
        parts.append(Text(warning, style="bold yellow"))
    parts.append(
        Text(
            f"{result['devices']} × {result['device_kind']} ({result['platform']}), compared with the "
            f"catalog's {result['catalog_base']}; {result['wall_s']:.1f} s"
        )
    )
    t = Table(title="matmul (n × n × n)")
    for col in ("dtype", "n", "time", "throughput", "of peak"):
        t.add_column(col, justify="left" if col == "dtype" else "right")
    for r in result["matmul"]:
        if "error" in r:
            t.add_row(r["dtype"], str(r["n"]), "-", "-", r["error"][:60])
            continue
        t.add_row(
            r["dtype"],
            str(r["n"]),
            f"{r['seconds'] * 1e3:.3g} ms",
            fmt_si(r["flops_per_s"], "FLOP/s"),
            f"{r['fraction']:.1%}" if "fraction" in r else "-",
        )
    parts.append(t)
    eff = result["profile"]["efficiency"]
    s = result.get("sustained_matmul")
    lines = [f"HBM streaming: {fmt_si(result['hbm_bytes_per_s'], 'B/s')} ({eff['hbm']:.1%} of the datasheet)"]
    if s:
        lines.append(
            f"sustained bf16 matmul (n={s['n']}, >= 1 s runs): {fmt_si(s['flops_per_s'], 'FLOP/s')}, "
            f"{s['relative_to_table']:.2f}× the short runs (efficiency.sustained {eff['sustained']:.2f})"
        )
    parts.append(Text("\n".join(lines)))
    if result["collectives"]:
        c = Table(title=f"collectives over {result['devices']} devices")
        for col in ("kind", "bytes", "time", "bandwidth / device", "of the model's"):
            c.add_column(col, justify="left" if col == "kind" else "right")
        for r in result["collectives"]:
            if "error" in r:
                c.add_row(r["kind"], "-", "-", r["error"][:60], "-")
            else:
                c.add_row(
                    r["kind"],
                    fmt_bytes(r["bytes"]),
                    f"{r['seconds'] * 1e3:.3g} ms",
                    fmt_si(r["bytes_per_s"], "B/s"),
                    f"{r['efficiency']:.0%}" if "efficiency" in r else "-",
                )
        parts.append(c)
    else:
        parts.append(
            Text("collectives: one device, nothing to measure (collective efficiency kept from the catalog)")
        )
    parts.append(
        Text(
            f"profile written to {result['out_path']} (use it as --hardware {result['out_path']})"
            if result.get("out_path")
            else "no profile written (pass --out FILE to keep one)"
        )
    )
    return Group(*parts)


def _plain(x: Any) -> Any:
    """Plain Python scalars/containers (YAML safe_dump rejects numpy floats)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x

"""The whole 1F1B-pipelined step of two large published layouts, compiled for the cpu stand-in: its loop
trip counts against the schedule arithmetic, and the microbatch ring it carries against the closed form's
in-flight memory. Writes large.json and large.md next to this file.

    python experiments/pipeline_compiled/large.py

Cases: a 530B GPT (Korthikanti et al. 2022's Table 3 model, `megatron-530b.yaml`) on 280 A100s as
tensor=8, pipeline=35, v=3, 280 microbatches of one sequence (their layout, data=1), remat=full; and
DeepSeek-V3 on 2,048 H800s as pipeline=16, expert=64, data=2 (compiled with data reduced to 1: 1,024
devices), 120 microbatches, ZeRO-1, remat=full, schedule 1f1b (DeepSeek ran DualPipe, which is not
executed; 1F1B is the closest executed schedule). Each case compiles in its own process (its device count).

What is compared: a tick loop's carry, read from the compiled HLO (the largest `while` carry holding
the ring): its microbatch ring (`[stages, K, chunk layers, mb, S, D]`) against the closed form's saved
activations x microbatches in flight, and, for DeepSeek (whose dense prefix runs before the pipeline),
the prefix-output source table and its gradient against the closed form's input buffers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "530B": {
        "model": str(HERE / "megatron-530b.yaml"),
        "hardware": ("a100", 280),
        "workload": {"global_batch": 280, "seq_len": 2048},
        "strategy": "tensor=8,pipeline=35,microbatches=280,v=3,remat=full",
        "devices": 280,
    },
    "deepseek-v3": {
        "model": "deepseek-v3",
        "hardware": ("h800", 2048),
        "workload": {"global_batch": 15360, "seq_len": 4096, "attention": "flash", "matmul_dtype": "fp8"},
        "strategy": "pipeline=16,expert=64,data=2,microbatches=120,zero=1,remat=full",
        "devices": 1024,
    },
}
DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "f8e4m3fn": 1, "u8": 1}


def _bytes(shape: str) -> int:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", shape).groups()
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * DTYPE_BYTES.get(dtype, 4)


def tick_carry(hlo: str, ring: str) -> list[str]:
    """The shapes in the largest `while` carry that holds the ring (`ring`: a regex of its shape): a
    tick loop's (the ring, the param-shaped gradient accumulators, the stage activations)."""
    best: list[str] = []
    for line in hlo.splitlines():
        if " while(" in line:
            shapes = re.findall(r"(\w+\[[\d,]*\])", line.split(" while(")[0])
            if any(re.match(ring, sh) for sh in shapes) and sum(map(_bytes, shapes)) > sum(map(_bytes, best)):
                best = shapes
    return best


def run_case(name: str) -> dict:
    from codesign.runtime import emulate_cpu_devices

    case = CASES[name]
    os.environ["JAX_PLATFORMS"] = "cpu"
    emulate_cpu_devices(os.environ, case["devices"])
    from codesign import arithmetic
    from codesign.closed_form import analytic_memory
    from codesign.closed_form.pipeline import in_flight_microbatches
    from codesign.compile.targets import compile_candidate
    from codesign.config import Workload
    from codesign.hardware.catalog import load_hardware
    from codesign.model_io import load_model_config
    from codesign.sharding.strategy import Strategy

    cfg = load_model_config(case["model"])
    hw = load_hardware(case["hardware"][0], devices=case["hardware"][1])
    wl = Workload(**case["workload"])
    s = Strategy.parse(case["strategy"])
    p, v, m = s.size("pipeline"), s.stages_per_device, s.microbatches
    with tempfile.TemporaryDirectory() as tmp:
        hlo_path = os.path.join(tmp, "step.hlo")
        t0 = time.perf_counter()
        r = compile_candidate(cfg, wl, s, hw, "cpu", save_hlo=hlo_path, max_compile_devices=case["devices"])
        wall = time.perf_counter() - t0
        if r.outcome != "ok":
            return {"case": name, "outcome": r.outcome, "message": r.message[:500]}
        hlo = Path(hlo_path).read_text()
    loops = arithmetic.pipeline_loops(m, p, v)
    # The ring: the carry array [1 stage, K slots, ...] in bf16.
    k = arithmetic.ring_slots(m, p, v)
    carry = tick_carry(hlo, rf"bf16\[1,{k},")
    ring = [sh for sh in carry if re.match(rf"bf16\[1,{k},", sh)]
    mem = analytic_memory(cfg, wl, s)
    in_flight = in_flight_microbatches(s.schedule, p, v, m)
    closed_ring = mem.saved_activations * in_flight
    source = [sh for sh in carry if re.search(rf"\[(1,)?{m},", sh) and sh not in ring]
    return {
        "case": name,
        "spec": s.spec,
        "compiled_mesh": dict(r.mesh),
        "compile_s": round(wall, 1),
        "loops_expected": list(loops),
        "while_trip_counts": sorted({n for _, n, _ in r.while_loops}),
        "ring_slots": k,
        "ring_compiled": ring,
        "ring_compiled_bytes": sum(map(_bytes, ring)),
        "ring_closed_form_bytes": closed_ring,
        "source_tables_compiled": source,
        "source_tables_compiled_bytes": sum(map(_bytes, source)),
        "buffers_closed_form_bytes": mem.pipeline_in_flight + mem.saved_activations - closed_ring,
        "closed_form_total_bytes": mem.total,
        "capacity_bytes": hw.memory_capacity_bytes,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2])))
        return
    rows = []
    for name in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", name], capture_output=True, text=True, check=False
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        row = (
            json.loads(lines[-1])
            if lines
            else {"case": name, "outcome": "error", "message": out.stderr[-500:]}
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    (HERE / "large.json").write_text(json.dumps(rows, indent=1))
    gib = 2**30
    md = [
        (
            "| case | compiled mesh | compile s | loops expected (warm-up, steady, drain) | `while` trips | ring "
            "compiled | ring GiB compiled / closed form | source tables compiled GiB / closed-form buffers GiB | "
            "closed-form total GiB (capacity) |"
        ),
        "|---|---|---:|---|---|---|---|---|---:|",
    ]
    for r in rows:
        if "spec" not in r:
            md.append(f"| {r['case']} | {r.get('outcome')}: {r.get('message', '')[:120]} |")
            continue
        mesh = ",".join(f"{a}={n}" for a, n in r["compiled_mesh"].items() if n > 1)
        md.append(
            f"| {r['case']} `{r['spec']}` | {mesh} | {r['compile_s']} | {r['loops_expected']} | "
            f"{r['while_trip_counts']} | {', '.join(r['ring_compiled'])} | "
            f"{r['ring_compiled_bytes'] / gib:.2f} / {r['ring_closed_form_bytes'] / gib:.2f} | "
            f"{r['source_tables_compiled_bytes'] / gib:.2f} / {r['buffers_closed_form_bytes'] / gib:.2f} | "
            f"{r['closed_form_total_bytes'] / gib:.1f} ({r['capacity_bytes'] / gib:.1f}) |"
        )
    (HERE / "large.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

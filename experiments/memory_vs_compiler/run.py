"""The closed form's memory per device against the real XLA:TPU compiler's, layout by layout.

Each row is one train step (a dense 8B-72B model or an MoE model on a v5e/v5p/v4 slice of 64-256
chips) compiled deviceless with libtpu (`compile_candidate(..., "tpu")`), next to the closed form's
`analytic_memory` of the same compiled program. A mesh over 64 chips is compiled with its data axis
reduced to fit 64 chips (`plan_compile`'s reduced-data-axis rule: data replicas do not change what one
device holds), and the closed form is read for that same compiled strategy and batch.

The compiler's figure is the compiled step's `memory_analysis()`: arguments + outputs - aliased + temporaries (the peak
the compiler plans for); for a layout it rejects (CompileTimeHbmOom) the figure is the one the OOM
message states. The compiles are slow on a small machine, so their results are stored in
`compiled.json` (keyed by the row's full description); the closed form is recomputed on every run.

    nice python experiments/memory_vs_compiler/run.py            # compile what is missing, then tabulate
    python experiments/memory_vs_compiler/run.py --no-compile    # tabulate stored compiles only
    python experiments/memory_vs_compiler/run.py --only ROW_ID   # one row

Writes compiled.json, results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from codesign.closed_form import analytic_memory
from codesign.config import ModelConfig, Workload
from codesign.hardware import load_hardware
from codesign.presets import get_preset
from codesign.sharding.strategy import Strategy

HERE = Path(__file__).resolve().parent
MAX_COMPILE_DEVICES = 64  # reduced data axis: what one device holds does not depend on the replicas

# A 13B LLaMA-2-style model (Touvron et al. 2023, Table 1 / HF meta-llama/Llama-2-13b config.json).
LLAMA2_13B = ModelConfig(
    name="llama2-13b", vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40, mlp_dim=13824,
    attention="mha",
)  # fmt: skip

EMBED_TENSOR = "experiments/memory_vs_compiler/embed_tensor.yaml"  # run from the repository root

# id, model, hardware, chips, global batch, seq len, strategy, attention
ROWS = [
    ("8b-v5e-full", "llama3-8b", "tpu-v5e", 64, 64, 4096, "fsdp=16,tensor=4,remat=full", "xla"),
    ("8b-v5e-full-sp", "llama3-8b", "tpu-v5e", 64, 64, 4096, "fsdp=16,tensor=4,remat=full,sp=1", "xla"),
    ("8b-v5p-dots", "llama3-8b", "tpu-v5p", 64, 64, 2048, "fsdp=64,remat=dots", "xla"),
    ("8b-v4-minimal", "llama3-8b", "tpu-v4", 64, 64, 4096, "fsdp=32,tensor=2,remat=minimal", "xla"),
    ("8b-v5e-dp-full", "llama3-8b", "tpu-v5e", 256, 256, 2048, "data=4,fsdp=16,tensor=4,remat=full", "xla"),
    ("13b-v4-full-sp", LLAMA2_13B, "tpu-v4", 128, 128, 4096, "data=2,fsdp=16,tensor=4,remat=full,sp=1", "xla"),
    ("70b-v5p-full", "llama3.1-70b", "tpu-v5p", 128, 128, 4096, "data=2,fsdp=16,tensor=4,remat=full", "xla"),
    ("70b-v5p-full-sp", "llama3.1-70b", "tpu-v5p", 128, 128, 4096, "data=2,fsdp=16,tensor=4,remat=full,sp=1", "xla"),
    ("70b-v5p-minimal-sp", "llama3.1-70b", "tpu-v5p", 256, 256, 4096, "data=4,fsdp=16,tensor=4,remat=minimal,sp=1", "xla"),
    ("72b-v5p-dots", "qwen2.5-72b", "tpu-v5p", 256, 64, 2048, "data=4,fsdp=16,tensor=4,remat=dots,sp=1", "xla"),
    ("70b-v4-full", "llama3.1-70b", "tpu-v4", 256, 256, 4096, "data=4,fsdp=16,tensor=4,remat=full", "xla"),
    ("8b-v5e-embed-tensor", "llama3-8b", "tpu-v5e", 64, 64, 4096, f"fsdp=16,tensor=4,remat=full,rules={EMBED_TENSOR}", "xla"),
    ("8b-v5p-flash-dots", "llama3-8b", "tpu-v5p", 64, 64, 4096, "fsdp=64,remat=dots", "flash"),
    ("8b-v5e-flash-full-sp", "llama3-8b", "tpu-v5e", 64, 64, 4096, "fsdp=16,tensor=4,remat=full,sp=1", "flash"),
    ("70b-v5p-flash-minimal-sp", "llama3.1-70b", "tpu-v5p", 128, 128, 4096, "data=2,fsdp=16,tensor=4,remat=minimal,sp=1", "flash"),
    ("mixtral-v5p-ep", "mixtral-8x7b", "tpu-v5p", 64, 64, 4096, "fsdp=8,expert=8,remat=full", "xla"),
    ("mixtral-v5p-tp", "mixtral-8x7b", "tpu-v5p", 128, 128, 4096, "data=2,fsdp=16,tensor=4,remat=full", "xla"),
]  # fmt: skip


def row_key(row) -> str:
    _, model, hw, chips, batch, seq, spec, attn = row
    m = model if isinstance(model, str) else model.fingerprint()
    return json.dumps([m, hw, chips, batch, seq, spec, attn])


def model_of(model) -> ModelConfig:
    return get_preset(model) if isinstance(model, str) else model


def compiler_memory(cfg: ModelConfig, w: Workload, s: Strategy, hw) -> dict:
    """Lower and compile the train step for the TPU slice deviceless; keep only the memory analysis (the
    HLO walk `compile_candidate` also runs costs minutes of Python on a 70B step and is not needed)."""
    from codesign import _compat
    from codesign.compile.devices import target_devices
    from codesign.compile.targets import parse_oom
    from codesign.sharding.mesh import MeshSpec
    from codesign.train_step import TrainProgram

    spec = MeshSpec.from_strategy(s)
    prog = TrainProgram(cfg, w, s, spec.build(target_devices("tpu", hw, spec.size)))
    try:
        compiled = prog.step_fn.lower(prog.abstract_state, prog.abstract_batch).compile()
    except Exception as e:  # noqa: BLE001 - an OOM is a result
        msg = f"{type(e).__name__}: {e}"
        oom = parse_oom(msg)
        if oom is None:
            return {"outcome": "error", "message": msg[:600]}
        return {
            "outcome": "oom",
            "message": msg[:600],
            "oom_required_bytes": oom[0],
            "oom_available_bytes": oom[1],
        }
    m = _compat.first_executable(compiled.memory_analysis())
    arg, out, alias, temp = (
        int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    )  # fmt: skip
    memory = {"argument": arg, "output": out, "alias": alias, "temp": temp, "peak": arg + out - alias + temp}
    return {"outcome": "ok", "memory": memory}


def buffer_assignment(dump_dir: Path) -> dict | None:
    """The HBM the compiler assigned, read from its buffer-assignment dump (None until it is written):
    `argument` = the entry parameters' allocations, `temp` = the preallocated temporaries of the
    default memory space; their sum is the report's `Total bytes` and what `memory_analysis()` returns
    once the (much slower) TPU code generation has finished."""
    files = sorted(dump_dir.glob("*jit__step*after_optimizations-buffer-assignment.txt"))
    reports = sorted(dump_dir.glob("*jit__step*after_optimizations-memory-usage-report.txt"))
    if not files or not reports:
        return None
    arg = temp = 0
    for line in files[0].read_text().splitlines():
        m = re.match(r"allocation \d+: size (\d+)(.*)", line)
        if not m:
            continue
        if "parameter" in m.group(2):
            arg += int(m.group(1))
        elif "preallocated-temp" in m.group(2) and "color" not in m.group(2):
            temp += int(m.group(1))
    total = re.search(r"Memory Space: default \(color=0\)\nTotal bytes: (\d+)", reports[0].read_text())
    return {
        "argument": arg,
        "temp": temp,
        "peak": arg + temp,
        "report_total": int(total.group(1)) if total else None,
    }


def plan_of(row):
    """What is compiled for one row (`plan_compile` for the TPU target, the data axis possibly reduced)."""
    from codesign.compile.targets import plan_compile

    _, model, hw_name, chips, batch, seq, spec, attn = row
    cfg, w, s = (
        model_of(model),
        Workload(global_batch=batch, seq_len=seq, attention=attn),
        Strategy.parse(spec),
    )
    return plan_compile(cfg, w, s, "tpu", load_hardware(hw_name, devices=chips), MAX_COMPILE_DEVICES)


def compile_row(row, dump_root: Path, wait_codegen: bool) -> dict:
    """Compile one row in a child process with XLA's dumps on. Unless `wait_codegen`, the child is
    stopped as soon as its buffer assignment is dumped (the memory figures are final there)."""
    from codesign.compile.targets import versions

    rid = row[0]
    plan = plan_of(row)
    dump = dump_root / rid
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)  # XLA writes nothing here when the executable comes from a cache
    out = dump / "result.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=^$"}
    t0 = time.time()
    child = subprocess.Popen([sys.executable, __file__, "--child", rid, "--child-out", str(out)], env=env)
    got, seen = None, None
    while child.poll() is None:
        time.sleep(5)
        mem = None if wait_codegen else buffer_assignment(dump)
        if mem is not None and mem == seen:  # the same twice: the dump is complete
            child.kill()
            child.wait()
            got = {"outcome": "ok", "memory": mem, "source": "buffer-assignment dump"}
        seen = mem
    if got is None:
        got = json.loads(out.read_text()) if out.exists() else {"outcome": "error", "message": "child died"}
        got["source"] = "memory_analysis"
        if got["outcome"] == "ok" and (mem := buffer_assignment(dump)) is not None:
            got["dump_memory"] = mem
    return {
        "key": row_key(row),
        "compiled_spec": plan.strategy.spec,
        "compiled_batch": plan.workload.global_batch,
        "memory": None,
        "message": "",
        **got,
        "compile_wall_s": round(time.time() - t0, 1),
        "versions": versions(),
    }


def child(rid: str, out: str) -> None:
    (row,) = [r for r in ROWS if r[0] == rid]
    plan = plan_of(row)
    hw = load_hardware(row[2], devices=plan.n_devices)
    Path(out).write_text(json.dumps(compiler_memory(plan.cfg, plan.workload, plan.strategy, hw)))


def closed_row(row, comp: dict) -> dict:
    rid, model, hw_name, chips, batch, seq, spec, attn = row
    cfg = model_of(model)
    w = Workload(global_batch=comp["compiled_batch"], seq_len=seq, attention=attn)
    s = Strategy.parse(comp["compiled_spec"])
    hw = load_hardware(hw_name, devices=chips)
    est = analytic_memory(cfg, w, s)
    cap = hw.memory_capacity_bytes
    if comp["outcome"] == "ok":
        compiler = comp["memory"]["peak"]  # memory_analysis() or the same figures from the dump
    elif comp["outcome"] == "oom":
        compiler = comp["oom_required_bytes"]
    else:
        compiler = None
    return {
        "id": rid,
        "model": cfg.name,
        "hardware": hw_name,
        "chips": chips,
        "global_batch": batch,
        "seq_len": seq,
        "strategy": spec,
        "compiled": comp["compiled_spec"],
        "attention": attn,
        "outcome": comp["outcome"],
        "compiler_bytes": compiler,
        "compiler_memory": comp["memory"],
        "closed_bytes": est.total,
        "closed_terms": est.to_json(),
        "ratio": est.total / compiler if compiler else None,
        "capacity_bytes": cap,
        "compiler_fits": comp["outcome"] == "ok" and compiler <= cap,
        "closed_fits": est.total <= cap,
    }


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| row | model | slice | batch x seq | strategy (compiled) | compiler GiB | closed form GiB | ratio "
        "| fits (compiler / closed) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        fits = f"{'yes' if r['compiler_fits'] else 'no'} / {'yes' if r['closed_fits'] else 'no'}"
        if r["outcome"] not in ("ok", "oom"):
            fits = f"{r['outcome']} / {'yes' if r['closed_fits'] else 'no'}"
        lines.append(
            f"| {r['id']} | {r['model']} | {r['hardware']} x{r['chips']} | {r['global_batch']} x {r['seq_len']} "
            f"| `{r['compiled']}` | {gib(r['compiler_bytes'])}{' (OOM)' if r['outcome'] == 'oom' else ''} "
            f"| {gib(r['closed_bytes'])} | {ratio} | {fits} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-compile", action="store_true", help="tabulate stored compiles only")
    ap.add_argument("--only", action="append", help="row id (repeatable)")
    ap.add_argument("--dump-root", default="/tmp/memory_vs_compiler", help="XLA dumps, one folder per row")
    ap.add_argument(
        "--wait-codegen", action="store_true", help="finish each compile and read memory_analysis()"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.child_out)
    store_path = HERE / "compiled.json"
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    out = []
    for row in rows:
        key = row_key(row)
        if key not in store and not args.no_compile:
            print(f"compiling {row[0]} ...", flush=True)
            store[key] = compile_row(row, Path(args.dump_root), args.wait_codegen)
            # Merge with what other runs stored meanwhile (one compile per process is the usual way).
            now = json.loads(store_path.read_text()) if store_path.exists() else {}
            store = {**now, key: store[key]}
            store_path.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
            (Path(args.dump_root) / row[0] / "row.json").write_text(json.dumps(store[key]))
            print(f"  {store[key]['outcome']} in {store[key]['compile_wall_s']} s", flush=True)
        if key in store:
            out.append(closed_row(row, store[key]))
    done = [r for r in out if r["ratio"] is not None]
    print(table(out))
    if args.only:
        return
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    within = sum(1 for r in done if abs(r["ratio"] - 1) <= 0.10)
    agree = sum(1 for r in out if r["compiler_fits"] == r["closed_fits"])
    (HERE / "results.md").write_text(
        table(out)
        + f"\n{within} of {len(done)} rows within +-10%; fit verdict agrees on {agree} of {len(out)}.\n"
    )


if __name__ == "__main__":
    main()

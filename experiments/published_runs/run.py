"""codesign's closed-form step time against the Megatron-LM runs of Korthikanti et al. 2022.

"Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198) trained four GPT
models on Selene (DGX A100-80GB, NVLink 3 inside a node, 8 x HDR InfiniBand per node) with tensor
parallelism 8, pipeline parallelism 1-64 (interleaved, 3 stages per GPU for 175B and 530B), no data
parallelism, fp16, one 2048-token sequence per microbatch (22B: four), and reported the iteration time
with full activation recomputation and with selective recomputation + sequence parallelism (Table 5),
and per-layer times of the 22B model (Table 4). Each row's published layout is written as a codesign
`Strategy` and priced by `estimate_analytic` on the catalog's `a100` system; nothing here is fitted to
these rows (the A100 efficiencies come from the catalog's cited microbenchmarks).

    python experiments/published_runs/run.py [--rows 22B,175B] [--hardware a100] [--out DIR] [--compile]

`--compile` also compiles each pipelined row's whole step (the executed 1F1B / interleaved-1F1B program,
`codesign.pipeline_1f1b`) for the cpu stand-in on the row's full device count, one process per row and
mode, and prices the compiled program (`estimate_from_report`): `compiled_s` beside `predicted_s`.

Writes results.json and results.md (default: next to this file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from codesign.closed_form.dropout import layer_dropout
from codesign.closed_form.params import shape_of
from codesign.config import ModelConfig, Workload
from codesign.cost.estimate import compute_dtype, estimate_analytic, matmul_size
from codesign.hardware import load_hardware
from codesign.sharding.strategy import Strategy

HERE = Path(__file__).resolve().parent
SEQ_LEN, VOCAB, TENSOR = 2048, 51_200, 8
PAPER = "Korthikanti et al. 2022, arXiv 2205.05198"
# Calculon (calculon-ai/calculon at caa4b11, `PYTHONPATH=. python bin/calculon llm-validation`, its
# Table 5 section with systems/a100_80g.json and validation/seqsel/tab5/*.json), iteration seconds.
CALCULON = "Calculon caa4b11 llm-validation (systems/a100_80g.json)"


@dataclass(frozen=True)
class Row:
    name: str
    heads: int
    hidden: int
    layers: int
    pipeline: int
    global_batch: int
    micro_batch: int
    stages_per_device: int
    published_full_s: float  # Table 5, full recompute
    published_selective_sp_s: float  # Table 5, selective recompute + sequence parallelism
    calculon_full_s: float
    calculon_selective_sp_s: float

    @property
    def gpus(self) -> int:
        return TENSOR * self.pipeline  # no data parallelism

    @property
    def microbatches(self) -> int:
        return self.global_batch // self.micro_batch  # GBS / (DP x MBS), DP = 1


ROWS = (
    Row("22B", 64, 6144, 48, 1, 4, 4, 1, 1.42, 1.10, 1.40, 1.14),
    Row("175B", 96, 12288, 96, 8, 64, 1, 3, 18.13, 13.75, 18.03, 13.64),
    Row("530B", 128, 20480, 105, 35, 280, 1, 3, 49.05, 37.83, 49.89, 34.47),
    Row("1T", 160, 25600, 128, 64, 512, 1, 1, 94.42, 71.49, 90.08, 66.04),
)
# Table 4: one 22B layer, milliseconds (forward, backward, total).
TABLE4_22B = {
    "none": (7.7, 11.9, 19.6),
    "full": (7.7, 19.5, 27.2),
    "selective": (7.7, 13.2, 20.9),
    "selective+sp": (7.2, 13.1, 20.3),
}
# (label, remat policy, sequence parallelism) for the two Table 5 columns. Megatron's full recompute is
# codesign's full_layer: the whole layer forward again (codesign's `full` lets XLA drop the FFN
# down-projection and its tensor all-reduce, which Megatron's checkpoint reruns).
MODES = (("full", "full_layer", False), ("selective+sp", "selective", True))
REMAT_OF = {"none": "none", "full": "full_layer", "selective": "selective", "selective+sp": "selective"}


def gpt(row: Row, layers: int | None = None) -> ModelConfig:
    """Megatron's GPT: MHA, a 4h GeLU MLP, tied input/output embeddings, vocabulary 51,200. codesign
    builds RoPE and RMSNorm where GPT has learned positions and LayerNorm: the same matmuls, a few
    elementwise bytes more (RoPE) per token."""
    return ModelConfig(
        name=f"megatron-gpt-{row.name}",
        vocab_size=VOCAB,
        hidden=row.hidden,
        layers=layers or row.layers,
        heads=row.heads,
        mlp_dim=4 * row.hidden,
        attention="mha",
        ffn_activation="gelu",
        tie_embeddings=True,
        # Megatron-LM's GPT defaults (--attention-dropout 0.1, --hidden-dropout 0.1); the paper's activation
        # memory (34 sbh + 5 a s^2 b per layer) counts their masks.
        attention_dropout=0.1,
        hidden_dropout=0.1,
        source=f"{PAPER}, Table 3 (GPT {row.name})",
    )


def workload(row: Row) -> Workload:
    """fp16 compute with Megatron's mixed precision: fp16 model weights, read by every microbatch,
    and an fp32 master copy with fp32 Adam moments in the optimizer, which accumulates the gradients
    in fp32 and writes the fp16 copy once per step (`master_dtype`). 2022 Megatron had no flash
    attention: the S x S scores are materialized (XLA attention)."""
    return Workload(
        global_batch=row.global_batch,
        seq_len=SEQ_LEN,
        dtype="float16",
        param_dtype="float16",
        master_dtype="float32",
        attention="xla",
    )


def strategy(row: Row, remat: str, sp: bool) -> Strategy:
    spec = f"tensor={TENSOR},pipeline={row.pipeline},microbatches={row.microbatches},remat={remat}"
    if sp:
        spec += ",sp=1"
    if row.stages_per_device > 1:
        spec += f",v={row.stages_per_device}"
    return Strategy.parse(spec)


def predict(row: Row, hardware: str) -> list[dict]:
    hw = load_hardware(hardware, devices=row.gpus)
    out = []
    for label, remat, sp in MODES:
        s = strategy(row, remat, sp)
        e = estimate_analytic(gpt(row), workload(row), s, hw)
        published = row.published_full_s if label == "full" else row.published_selective_sp_s
        calculon = row.calculon_full_s if label == "full" else row.calculon_selective_sp_s
        out.append(
            {
                "model": row.name,
                "recompute": label,
                "strategy": s.spec,
                "gpus": row.gpus,
                "global_batch": row.global_batch,
                "predicted_s": e.step_time_s,
                "published_s": published,
                "error": e.step_time_s / published - 1,
                "calculon_s": calculon,
                "calculon_error": calculon / published - 1,
                "compute_s": e.compute_s,
                "memory_bound_s": max(e.memory_s, e.vector_s),
                "exposed_collective_s": e.exposed_collective_s,
                "collective_s": dict(e.collective_s),
                "pipeline_p2p_s": e.collective_s.get("collective-permute", 0.0),
                "pipeline_bubble_s": e.pipeline_bubble_s,
                "memory_per_device_gb": e.memory_per_device_bytes / 1e9,
                "fits": e.fits,
            }
        )
    return out


def per_layer_22b(hardware: str) -> list[dict]:
    """One 22B layer's time: the step of the 48-layer model minus the step of 47 layers (the same
    layout), i.e. forward + backward + recompute of one layer, plus its share of the optimizer update.
    The closed form prices a step, not separate forward and backward passes."""
    row = ROWS[0]
    hw = load_hardware(hardware, devices=row.gpus)
    out = []
    for label, (fwd, bwd, total) in TABLE4_22B.items():
        s = strategy(row, REMAT_OF[label], label.endswith("+sp"))
        full = estimate_analytic(gpt(row), workload(row), s, hw).step_time_s
        less = estimate_analytic(gpt(row, row.layers - 1), workload(row), s, hw).step_time_s
        ms = (full - less) * 1e3
        out.append(
            {
                "recompute": label,
                "strategy": s.spec,
                "predicted_ms": ms,
                "published_forward_ms": fwd,
                "published_backward_ms": bwd,
                "published_ms": total,
                "error": ms / total - 1,
            }
        )
    return out


def megatron_differences(row: Row, hardware: str) -> dict:
    """Work Megatron's program does that codesign's does not, counted by mechanism and priced with the
    estimate's own rates; NOT added to the prediction. Per layer per microbatch, seconds:
    - dead_code_recompute: a PyTorch checkpoint reruns the whole checkpointed function; XLA drops what
      backward does not need. Full recompute is in the prediction (remat=full_layer runs it); selective
      (Megatron checkpoints the attention core) reruns the probabilities x V product that XLA drops
      (the context is kept), priced at the estimate's matmul rate.
    - dropout: GPT's attention dropout on the b*(heads/tp)*s*s probabilities is its own kernel (read
      and write fp16, write a 1-byte mask; backward reads the gradient and mask and writes one: 5 + 5
      bytes per score, 5 more where the core is recomputed), and its two hidden dropouts are fused into
      bias-dropout-add (1-byte mask written, read back in backward: 2 bytes per residual element,
      divided by tensor under sp). codesign's program has dropout too, fused by XLA into the softmax
      and residual kernels (`closed_form/dropout.py`: the dropped probabilities and kept masks only), and
      that is in the prediction; the column is Megatron's bytes minus codesign's, at the HBM rate."""
    hw = load_hardware(hardware, devices=row.gpus)
    cfg, w = gpt(row), workload(row)
    out = {}
    for label, remat, sp in MODES:
        s = strategy(row, remat, sp)
        dtype = compute_dtype(w)
        rate = (hw.peak_flops.get(dtype) or hw.peak_flops["bf16"]) * hw.efficiency.matmul_fraction(
            dtype, matmul_size(cfg, w, s)
        )
        tokens = row.micro_batch * SEQ_LEN
        scores = row.micro_batch * cfg.heads / TENSOR * SEQ_LEN * SEQ_LEN
        recompute = 2 * scores * cfg.head_dim / rate if remat == "selective" else 0.0
        core_passes = 3  # forward, backward, recompute (both policies rerun the attention core)
        residual = tokens * cfg.hidden / (TENSOR if sp else 1)
        megatron_bytes = 5 * scores * core_passes + 2 * 2 * residual
        ours = layer_dropout(cfg, remat, shape_of(cfg, w, s), w.flash).hbm_bytes  # per microbatch
        dropout = (megatron_bytes - ours) / (hw.chip.hbm_bytes_per_s * hw.efficiency.hbm)
        per_step = row.layers / row.pipeline * row.microbatches  # layer-microbatches per device
        out[label] = {
            "dead_code_recompute_ms_per_layer": recompute * 1e3,
            "dropout_ms_per_layer": dropout * 1e3,
            "dead_code_recompute_s_per_step": recompute * per_step,
            "dropout_s_per_step": dropout * per_step,
        }
    return out


def compiled_row(name: str, label: str, hardware: str) -> dict:
    """One row and mode priced from its compiled program (runs in a process started with row.gpus
    emulated devices, `add_compiled`)."""
    row = next(r for r in ROWS if r.name == name)
    from codesign.compile.targets import compile_candidate
    from codesign.cost.estimate import estimate_from_report

    _, remat, sp = next(m for m in MODES if m[0] == label)
    hw = load_hardware(hardware, devices=row.gpus)
    s = strategy(row, remat, sp)
    r = compile_candidate(gpt(row), workload(row), s, hw, "cpu", max_compile_devices=row.gpus)
    if r.outcome != "ok":
        return {"outcome": r.outcome, "message": r.message[:300]}
    e = estimate_from_report(gpt(row), workload(row), s, hw, r)
    return {
        "outcome": "ok",
        "compile_s": round(r.compile_s, 1),
        "while_trip_counts": sorted({n for _, n, _ in r.while_loops}),
        "compiled_s": e.step_time_s,
        "compiled_bubble_s": e.pipeline_bubble_s,
        "compiled_compute_s": e.compute_s,
    }


def add_compiled(rows: list[dict], hardware: str) -> None:
    """`compiled_s` (and its error) for every pipelined row, each compiled in its own process."""
    import os
    import subprocess

    from codesign.runtime import emulate_cpu_devices

    for r in rows:
        if Strategy.parse(r["strategy"]).size("pipeline") <= 1:
            continue
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        emulate_cpu_devices(env, r["gpus"])  # before the child's JAX starts
        cmd = [sys.executable, __file__, "--compiled-row", r["model"], r["recompute"], "--hardware", hardware]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        got = json.loads(lines[-1]) if lines else {"outcome": "error", "message": out.stderr[-300:]}
        r["compiled"] = got
        if got.get("outcome") == "ok":
            r["compiled_error"] = got["compiled_s"] / r["published_s"] - 1
        print(json.dumps({"model": r["model"], "recompute": r["recompute"], **got}), flush=True)


def summary(rows: list[dict], key: str) -> dict[str, float]:
    errs = [abs(r[key]) for r in rows]
    return {"mean_abs": statistics.fmean(errs), "max_abs": max(errs)} if errs else {}


def run(names: list[str] | None = None, hardware: str = "a100", compiled: bool = False) -> dict:
    chosen = [r for r in ROWS if names is None or r.name in names]
    if not chosen:
        raise SystemExit(f"no rows named {names}; rows: {[r.name for r in ROWS]}")
    rows = [p for r in chosen for p in predict(r, hardware)]
    if compiled:
        add_compiled(rows, hardware)
    differences = {r.name: megatron_differences(r, hardware) for r in chosen}
    result = {
        "hardware": hardware,
        "paper": PAPER,
        "calculon": CALCULON,
        "rows": rows,
        "summary": {},
        "megatron_differences": differences,
    }
    for label, _, _ in MODES:
        sel = [r for r in rows if r["recompute"] == label]
        result["summary"][label] = {
            "codesign": summary(sel, "error"),
            "calculon": summary(sel, "calculon_error"),
        }
        with_compiled = [r for r in sel if "compiled_error" in r]
        if with_compiled:
            result["summary"][label]["codesign_compiled"] = summary(with_compiled, "compiled_error")
            result["summary"][label]["codesign_same_rows"] = summary(with_compiled, "error")
    if any(r.name == "22B" for r in chosen):
        result["per_layer_22b"] = per_layer_22b(hardware)
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Hardware `{result['hardware']}`; published: {result['paper']}, Table 5; Calculon: {result['calculon']}.",
        (
            "Error = predicted / published - 1. Breakdown columns are codesign's (seconds per iteration): "
            "matmul kernels, memory-bound kernels, exposed collectives (tensor-parallel and pipeline "
            "point-to-point), pipeline bubble."
        ),
        "",
        (
            "| model | recompute | strategy | GPUs | predicted s | published s | error | Calculon s | Calculon error "
            "| matmul s | memory-bound s | exposed collectives s | of which pipeline p2p s | bubble s |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['recompute']} | `{r['strategy']}` | {r['gpus']} | {r['predicted_s']:.2f} | "
            f"{r['published_s']:.2f} | {r['error']:+.1%} | {r['calculon_s']:.2f} | {r['calculon_error']:+.1%} | "
            f"{r['compute_s']:.2f} | {r['memory_bound_s']:.2f} | {r['exposed_collective_s']:.2f} | "
            f"{r['pipeline_p2p_s']:.2f} | {r['pipeline_bubble_s']:.2f} |"
        )
    lines += ["", "| recompute | codesign mean abs error | codesign max | Calculon mean | Calculon max |"]
    lines.append("|---|---:|---:|---:|---:|")
    for label, s in result["summary"].items():
        c, k = s["codesign"], s["calculon"]
        if c:
            lines.append(
                f"| {label} | {c['mean_abs']:.1%} | {c['max_abs']:.1%} | {k['mean_abs']:.1%} | {k['max_abs']:.1%} |"
            )
    compiled = [r for r in result["rows"] if "compiled" in r]
    if compiled:
        lines += [
            "",
            "Pipelined rows priced from their compiled program (cpu stand-in, whole step, full device count):",
            "",
            "| model | recompute | compile s | `while` trips | closed form s | compiled s | published s | error |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in compiled:
            c = r["compiled"]
            if c.get("outcome") != "ok":
                lines.append(
                    f"| {r['model']} | {r['recompute']} | {c.get('outcome')}: {c.get('message', '')[:80]} |"
                )
                continue
            lines.append(
                f"| {r['model']} | {r['recompute']} | {c['compile_s']} | {c['while_trip_counts']} | "
                f"{r['predicted_s']:.2f} | {c['compiled_s']:.2f} | {r['published_s']:.2f} | "
                f"{r['compiled_error']:+.1%} |"
            )
    lines += [
        "",
        (
            "Work Megatron's program does and codesign's does not (by count, priced at the estimate's rates; "
            "NOT in the prediction above), per layer per microbatch and per device per iteration "
            "(busy time, before pipeline ticks):"
        ),
        "",
        (
            "| model | recompute | recompute XLA drops ms/layer | unfused dropout ms/layer "
            "| recompute XLA drops s/iter | unfused dropout s/iter |"
        ),
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by_mode in result["megatron_differences"].items():
        for label, d in by_mode.items():
            lines.append(
                f"| {name} | {label} | {d['dead_code_recompute_ms_per_layer']:.2f} | "
                f"{d['dropout_ms_per_layer']:.2f} | {d['dead_code_recompute_s_per_step']:.2f} | "
                f"{d['dropout_s_per_step']:.2f} |"
            )
    if "per_layer_22b" in result:
        lines += [
            "",
            "One 22B layer (Table 4; codesign: step(48 layers) - step(47 layers), forward + backward together):",
            "",
            "| recompute | strategy | predicted ms | published fwd / bwd / total ms | error |",
            "|---|---|---:|---:|---:|",
        ]
        for r in result["per_layer_22b"]:
            lines.append(
                f"| {r['recompute']} | `{r['strategy']}` | {r['predicted_ms']:.1f} | "
                f"{r['published_forward_ms']} / {r['published_backward_ms']} / {r['published_ms']} | "
                f"{r['error']:+.1%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", help=f"comma-separated subset of {', '.join(r.name for r in ROWS)}")
    ap.add_argument("--hardware", default="a100", help="catalog name or profile (default: a100)")
    ap.add_argument("--out", default=str(HERE), help="directory for results.json and results.md")
    ap.add_argument("--compile", action="store_true", help="also price each pipelined row's compiled step")
    ap.add_argument("--compiled-row", nargs=2, metavar=("ROW", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compiled_row:
        print(json.dumps(compiled_row(*args.compiled_row, args.hardware)))
        return {}
    result = run(args.rows.split(",") if args.rows else None, args.hardware, args.compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / "results.md").write_text(md + "\n")
    print(md, file=sys.stdout)
    return result


if __name__ == "__main__":
    main()

"""DeepSeek-V3's published training step (ISCA 2025 Table 4) next to codesign's prediction of the same
layout, and what codesign's planner picks on the same 2,048 H800s. Writes results.json and results.md.

    python experiments/deepseek_v3_training/run.py            # closed form only: seconds

The planner's own pick on the same cluster is the CLI's (see README.md):
    codesign plan --model deepseek-v3 --hardware h800 --devices 2048 --global-batch 15360 --seq-len 4096 \
        --target analytic --matmul-dtype fp8
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = Path(__file__).resolve().parent

# ISCA 2025 ("Insights into DeepSeek-V3", Table 4, the MPFT column): seconds per step and MFU (BF16 peak).
PUBLISHED = {
    "1F": 1.13,
    "bubble": 2.06,
    "1B": 1.99,
    "1W": 0.48,
    "1F1B": 13.95,
    "optimizer": 0.29,
    "step": 19.926,
    "mfu_noncausal": 0.4373,
    "mfu_causal": 0.3894,
}
# The DeepSeek-V3 technical report's layout: 16-way DualPipe, 64-way EP over 8 nodes, ZeRO-1 DP (2 x 64 =
# 128 data-parallel ranks per stage), no TP; 15,360 sequences per step = 120 per DP rank, one per
# microbatch. remat=none: DeepSeek recomputes only RMSNorm and the MLA up-projections (negligible FLOPs).
PUBLISHED_SPEC = "pipeline=16,schedule=dualpipe,expert=64,data=2,zero=1,microbatches=120,remat=none"
BATCH, SEQ, DEVICES = 15360, 4096, 2048
# DeepSeek-V3's mixed precision (technical report, 3.3): BF16 weights, FP32 master weights and FP32
# gradient accumulation in the ZeRO-1-sharded optimizer. (Its AdamW moments are BF16; codesign keeps
# them in the master's dtype, FP32, so the optimizer term is 2x DeepSeek's: 1/128 of the stage state.)
PRECISION = {"param_dtype": "bfloat16", "master_dtype": "float32"}


def model():
    """DeepSeek-V3 with balanced routing: DeepSeek trains dropless with auxiliary-loss-free balancing, so
    each expert's grouped GEMM sees k x tokens / E rows; capacity_factor=1.0 is that load (not a fit)."""
    from codesign.presets import get_preset

    return get_preset("deepseek-v3").replace(capacity_factor=1.0)


def predict(matmul_dtype: str, attention: str = "xla") -> dict:
    from codesign import arithmetic
    from codesign.closed_form import sharded_params
    from codesign.config import Workload
    from codesign.cost.estimate import estimate_analytic
    from codesign.hardware import load_hardware
    from codesign.sharding.strategy import Strategy

    cfg, hw = model(), load_hardware("h800", devices=DEVICES)
    # attention="flash" is cuDNN's fused kernel on this GPU: MLA's v head is zero-padded to the q/k head
    # dim (128 -> 192) and the padded FLOPs are counted (`codesign.models.attention`).
    wl = Workload(
        global_batch=BATCH, seq_len=SEQ, matmul_dtype=matmul_dtype, attention=attention, **PRECISION
    )
    s = Strategy.parse(PUBLISHED_SPEC)
    est = estimate_analytic(cfg, wl, s, hw)
    # AdamW's update: read the f32 master, gradient and moments (+ the gradient for the norm), write
    # the master and moments, and the new bf16 weights, over the local params: the closed form's
    # optimizer term (`closed_form.program._accelerator_traffic`), timed alone.
    local = sum(p.local_elems * p.count for p in sharded_params(cfg, s))
    opt_s = (8 * wl.update_bytes + wl.param_bytes) * local / (hw.chip.hbm_bytes_per_s * hw.efficiency.hbm)
    tokens = BATCH * SEQ
    peak = DEVICES * hw.peak_flops["bf16"] * est.step_time_s
    return {
        "matmul_dtype": matmul_dtype + (f", {attention} attention" if attention != "xla" else ""),
        "spec": s.spec,
        "step_s": est.step_time_s,
        "compute_s": est.compute_s,
        "memory_bound_s": max(est.memory_s, est.vector_s),
        "exposed_collective_s": est.exposed_collective_s,
        "bubble_s": est.pipeline_bubble_s,
        "optimizer_s": opt_s,
        "collective_s": dict(est.collective_s),
        "mfu_causal": arithmetic.train_flops_per_token(cfg, SEQ, causal=True) * tokens / peak,
        "mfu_noncausal": arithmetic.train_flops_per_token(cfg, SEQ, causal=False) * tokens / peak,
        "memory_gib": est.memory_per_device_bytes / 2**30,
        "fits": est.fits,
        "reasons": list(est.reasons),
    }


def memory_terms() -> dict:
    """The memory model's terms for the published layout under three remat policies (GiB per device)."""
    from codesign.closed_form import analytic_memory
    from codesign.config import Workload
    from codesign.sharding.strategy import Strategy

    wl = Workload(global_batch=BATCH, seq_len=SEQ, matmul_dtype="fp8", attention="flash", **PRECISION)
    out = {}
    for remat in ("none", "selective", "full"):
        s = Strategy.parse(PUBLISHED_SPEC.replace("remat=none", f"remat={remat}"))
        m = analytic_memory(model(), wl, s, platform="gpu")
        out[remat] = {k: v / 2**30 for k, v in vars(m).items() if isinstance(v, (int, float))}
    return out


def memory_markdown(terms: dict) -> str:
    keys = list(next(iter(terms.values())))
    out = ["", "Memory model, GiB per device, published layout by remat policy:", ""]
    out += ["| remat | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for remat, t in terms.items():
        out.append(f"| {remat} | " + " | ".join(f"{t[k]:.1f}" for k in keys) + " |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict]) -> str:
    pub = PUBLISHED
    out = [
        f"Layout: `{PUBLISHED_SPEC}`, {BATCH} x {SEQ} tokens, 2,048 H800 (`--hardware h800`).",
        "",
        "| term | ISCA Table 4 | " + " | ".join(f"codesign {r['matmul_dtype']}" for r in rows) + " |",
        "|---|---:|" + "---:|" * len(rows),
    ]

    def line(name, published, key, fmt="{:.2f} s"):
        vals = " | ".join(fmt.format(r[key]) for r in rows)
        out.append(f"| {name} | {published} | {vals} |")

    busy = pub["1F"] + pub["1B"] + pub["1W"] + pub["1F1B"]
    line("compute phases (1F + 1B + 1W + 1F1B)", f"{busy:.2f} s", "compute_s")
    line("memory-bound kernels", "-", "memory_bound_s")
    line("exposed communication", "- (hidden)", "exposed_collective_s")
    line("bubble", f"{pub['bubble']:.2f} s", "bubble_s")
    line("optimizer", f"{pub['optimizer']:.2f} s", "optimizer_s")
    line("step", f"{pub['step']:.3f} s", "step_s")
    out.append(
        "| step predicted / published | 1 | "
        + " | ".join(f"{r['step_s'] / pub['step']:.2f}" for r in rows)
        + " |"
    )
    line("MFU non-causal (BF16 peak)", f"{pub['mfu_noncausal']:.2%}", "mfu_noncausal", "{:.2%}")
    line("MFU causal", f"{pub['mfu_causal']:.2%}", "mfu_causal", "{:.2%}")
    line("memory per device", "fits in 80 GB", "memory_gib", "{:.0f} GiB")
    for r in rows:
        out += ["", f"Reasons ({r['matmul_dtype']}):", ""] + [f"- {x}" for x in r["reasons"]]
    return "\n".join(out) + "\n"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    rows = [predict("fp8"), predict("bf16"), predict("fp8", "flash"), predict("bf16", "flash")]
    doc = {"published": PUBLISHED, "predicted": rows, "memory_gib_by_remat": memory_terms()}
    text = markdown(rows) + memory_markdown(doc["memory_gib_by_remat"])
    (HERE / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

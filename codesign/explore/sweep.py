"""`codesign explore sweep`: vary hardware and model knobs, re-plan at every point, record the best plan.

Hardware knobs edit a catalog entry; model knobs rewrite the ModelConfig. Every point runs the
planner (analytic by default, compile-verified with `verify=True`). Points that differ only in
hardware reuse the compiled reports of earlier points and are re-costed, not recompiled: a compile
measures the program, and the program does not change when only the hardware does.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codesign.config import ModelConfig, Workload
from codesign.hardware.catalog import Hardware
from codesign.units import fmt_knob

HARDWARE_KNOBS = ("scaleup_size", "scaleup_bw", "scaleout_bw", "hbm_bytes", "hbm_bw", "flops_scale", "dtype")
MODEL_KNOBS = ("attention", "experts", "top_k", "node_limit")
KNOBS = HARDWARE_KNOBS + MODEL_KNOBS
_SUFFIX = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


class SweepError(ValueError):
    pass


def parse_value(knob: str, text: str) -> Any:
    if knob in ("attention", "dtype"):
        return text
    t = text.strip()
    scale = _SUFFIX.get(t[-1:].upper(), 1.0) if t[-1:].isalpha() else 1.0
    try:
        v = float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise SweepError(f"{knob}={text!r}: expected a number (suffixes K, M, G, T allowed)") from None
    return int(v) if knob in ("scaleup_size", "hbm_bytes", "experts", "top_k", "node_limit") else v


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """`--vary scaleup_bw=160G,450G,900G --vary scaleup_size=8,72` -> {knob: [values]}."""
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--vary {item!r}: write knob=v1,v2,...; knobs: {', '.join(KNOBS)}")
        knob, vals = item.split("=", 1)
        if knob not in KNOBS:
            raise SweepError(f"unknown sweep knob {knob!r}; knobs: {', '.join(KNOBS)}")
        out[knob] = [parse_value(knob, v) for v in vals.split(",") if v]
    if not out:
        raise SweepError(f"give at least one --vary knob=v1,v2 (knobs: {', '.join(KNOBS)})")
    return out


def apply_hardware(hw: Hardware, knobs: dict[str, Any], n_devices: int) -> Hardware:
    chip, levels = hw.chip, list(hw.levels)
    if "scaleup_size" in knobs and levels:
        levels[0] = dataclasses.replace(levels[0], max_group_size=int(knobs["scaleup_size"]))
    if "scaleup_bw" in knobs and levels:
        levels[0] = dataclasses.replace(levels[0], bytes_per_s=float(knobs["scaleup_bw"]))
    if "scaleout_bw" in knobs:
        if len(levels) < 2:
            raise SweepError(f"{hw.name} has no scale-out level to vary")
        levels[1] = dataclasses.replace(levels[1], bytes_per_s=float(knobs["scaleout_bw"]))
    if "hbm_bytes" in knobs:
        chip = dataclasses.replace(chip, hbm_bytes=int(knobs["hbm_bytes"]))
    if "hbm_bw" in knobs:
        chip = dataclasses.replace(chip, hbm_bytes_per_s=float(knobs["hbm_bw"]))
    if "flops_scale" in knobs:
        chip = dataclasses.replace(
            chip, peak_flops={k: v * knobs["flops_scale"] for k, v in chip.peak_flops.items()}
        )
    if "dtype" in knobs and knobs["dtype"] not in chip.peak_flops:
        raise SweepError(f"{hw.name} has no {knobs['dtype']} peak (it has {sorted(chip.peak_flops)})")
    return dataclasses.replace(hw, chip=chip, levels=tuple(levels)).with_devices(n_devices)


def _workload_at(workload: Workload, point: dict[str, Any]) -> Workload:
    """dtype=fp8 prices the GEMMs in FP8 the way the reference programs run them (`matmul_dtype`);
    any other dtype is the compute dtype of every matmul."""
    if "dtype" not in point:
        return workload
    if point["dtype"] == "fp8":
        return dataclasses.replace(workload, matmul_dtype="fp8")
    return dataclasses.replace(workload, dtype=point["dtype"], matmul_dtype="bf16")


def apply_model(cfg: ModelConfig, knobs: dict[str, Any]) -> ModelConfig:
    """Model rewrites, each documented:

    attention=mha|gqa|mla: mha sets kv_heads=heads; gqa sets kv_heads=8 (or heads when smaller);
      mla adopts DeepSeek-V3's proportions: kv_lora_rank=4*head_dim, qk_rope=head_dim/2,
      qk_nope=v_head=head_dim, no q low-rank.
    experts=E (0 = dense): a dense model becomes MoE with every layer routed and each expert
      mlp_dim/top_k wide, so active FFN compute per token stays the same.
    top_k=k: experts per token (expert width is rescaled the same way).
    node_limit=M: node-limited routing, each token to at most M of the model's expert groups
      (`groups_per_token`; 0 = no limit).
    """
    kw: dict[str, Any] = {}
    attn = knobs.get("attention")
    hd = cfg.head_dim or cfg.hidden // cfg.heads
    if attn == "mha":
        kw.update(attention="mha", kv_heads=cfg.heads, head_dim=hd)
    elif attn == "gqa":
        kw.update(attention="gqa", kv_heads=min(8, cfg.heads), head_dim=hd)
    elif attn == "mla":
        kw.update(
            attention="mla",
            kv_lora_rank=4 * hd,
            qk_rope_head_dim=hd // 2,
            qk_nope_head_dim=hd,
            v_head_dim=hd,
            q_lora_rank=0,
            kv_heads=cfg.heads,
        )
    elif attn is not None:
        raise SweepError(f"attention={attn!r}: use mha, gqa or mla")
    if "experts" in knobs or "top_k" in knobs:
        e = int(knobs.get("experts", cfg.n_routed_experts))
        k = int(knobs.get("top_k", cfg.experts_per_token or 2))
        base_width = cfg.mlp_dim or cfg.moe_mlp_dim * max(1, cfg.experts_per_token)
        if e == 0:
            kw.update(
                n_routed_experts=0,
                n_shared_experts=0,
                experts_per_token=0,
                first_dense_layers=0,
                mlp_dim=base_width,
            )
        else:
            if k > e:
                raise SweepError(f"top_k={k} > experts={e}")
            kw.update(
                n_routed_experts=e,
                experts_per_token=k,
                moe_mlp_dim=max(1, base_width // k),
                first_dense_layers=cfg.first_dense_layers if cfg.is_moe else 0,
            )
    if "node_limit" in knobs:
        if not cfg.is_moe and not kw.get("n_routed_experts"):
            raise SweepError("node_limit=M needs an MoE model (or an experts=E knob)")
        kw["groups_per_token"] = int(knobs["node_limit"])
    return cfg.replace(**kw) if kw else cfg


@dataclass
class SweepResult:
    points: list[dict[str, Any]]
    wall_s: float
    recost_saved_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "wall_s": round(self.wall_s, 2),
            "recost_saved_compile_s": round(self.recost_saved_s, 2),
        }


def run_sweep(
    cfg: ModelConfig,
    hardware: Hardware,
    workload: Workload,
    n_devices: int,
    vary: dict[str, list[Any]],
    *,
    verify: bool = False,
    target: str = "auto",
    top_k: int = 2,
    timeout_s: float = 600,
    progress: Callable[[str, int, int], None] | None = None,
) -> SweepResult:
    from codesign.planner import PlanRequest, plan

    t0 = time.perf_counter()
    knobs = list(vary)
    grid = list(itertools.product(*(vary[k] for k in knobs)))
    reuse_by_program: dict[str, dict] = {}
    points, saved = [], 0.0
    for i, values in enumerate(grid):
        point = dict(zip(knobs, values))
        row: dict[str, Any] = {"knobs": point}
        try:
            hw = apply_hardware(hardware, point, n_devices)
            model = apply_model(cfg, point)
            w = _workload_at(workload, point)
            program_key = json.dumps([model.fingerprint(), w.to_json(), target])
            reuse = reuse_by_program.setdefault(program_key, {})
            before = {k: v.compile_s for k, v in reuse.items()}
            req = PlanRequest(
                cfg=model,
                hardware=hw,
                workload=w,
                n_devices=n_devices,
                target=target if verify else "analytic",
                top_k=top_k,
                timeout_s=timeout_s,
                reuse=reuse if verify else None,
            )
            result = plan(req)
            reused = [r for r in result.candidates if r.get("compiled") and r["strategy"]["spec"] in before]
            saved += sum(before[r["strategy"]["spec"]] for r in reused)
            best = result.best
            row.update(
                {
                    "best_spec": best["strategy"]["spec"] if best else None,
                    "step_time_s": best["step_time_s"] if best else None,
                    "mfu": best["mfu"] if best else None,
                    "memory_per_device_bytes": best["memory_per_device_bytes"] if best else None,
                    "fits": best is not None,
                    "recompiled": bool(verify and len(reuse) > len(before)),
                    "reason": None if best else "; ".join(result.explanation[:1]) or "no layout fits",
                }
            )
        except Exception as e:  # noqa: BLE001 - a bad point is a row with its reason, never a dead sweep
            row.update(
                {
                    "best_spec": None,
                    "step_time_s": None,
                    "mfu": None,
                    "memory_per_device_bytes": None,
                    "fits": False,
                    "recompiled": False,
                    "reason": f"{type(e).__name__}: {e}",
                }
            )
        points.append(row)
        if progress:
            progress("sweep", i + 1, len(grid))
    return SweepResult(points, time.perf_counter() - t0, saved)


def write_outputs(result: SweepResult, out_prefix: str) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump(result.to_json(), f, indent=1)
    knobs = list(result.points[0]["knobs"]) if result.points else []
    cols = knobs + [
        "best_spec",
        "step_time_s",
        "mfu",
        "memory_per_device_bytes",
        "fits",
        "recompiled",
        "reason",
    ]
    with open(out_prefix + ".csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for p in result.points:
            wr.writerow([p["knobs"][k] for k in knobs] + [p.get(c) for c in cols[len(knobs) :]])
    return [out_prefix + ".json", out_prefix + ".csv"]


def plot_sweep(result: SweepResult, path: str, metric: str = "mfu") -> None:
    """A line chart for one varied knob, a heatmap (with the chosen layout written in) for two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    knobs = list(result.points[0]["knobs"])
    fig, ax = plt.subplots(figsize=(8, 5))
    val = lambda p: p.get(metric) if p.get(metric) is not None else math.nan
    if len(knobs) == 1:
        k = knobs[0]
        xs = [p["knobs"][k] for p in result.points]
        ax.plot(range(len(xs)), [val(p) for p in result.points], "-o")
        ax.set_xticks(range(len(xs)), [fmt_knob(x) for x in xs])
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        for i, p in enumerate(result.points):
            ax.annotate(p.get("best_spec") or "no fit", (i, val(p)), fontsize=6, rotation=20)
    else:
        k1, k2 = knobs[:2]
        v1 = list(dict.fromkeys(p["knobs"][k1] for p in result.points))
        v2 = list(dict.fromkeys(p["knobs"][k2] for p in result.points))
        grid = np.full((len(v1), len(v2)), np.nan)
        for p in result.points:
            grid[v1.index(p["knobs"][k1]), v2.index(p["knobs"][k2])] = val(p)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_yticks(range(len(v1)), [fmt_knob(v) for v in v1])
        ax.set_xticks(range(len(v2)), [fmt_knob(v) for v in v2])
        ax.set_ylabel(k1)
        ax.set_xlabel(k2)
        for p in result.points:
            ax.text(
                v2.index(p["knobs"][k2]),
                v1.index(p["knobs"][k1]),
                (p.get("best_spec") or "no fit")[:28],
                ha="center",
                va="center",
                fontsize=5,
                color="w",
            )
    ax.set_title(f"sweep: {metric} of the best plan")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

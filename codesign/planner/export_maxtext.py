"""The chosen plan as MaxText config overrides (`codesign plan --export maxtext`).

MaxText takes `key=value` overrides after its base config on the command line and rejects any key its
config does not define (`MaxTextConfig` is a pydantic model with `extra="forbid"`; pyconfig raises
`'<key>' not in ...`). So the export holds only MaxText keys, and everything else is a `#` comment.

How MaxText turns the overrides into a batch (src/maxtext/configs/types.py, `calculate_global_batch_sizes`,
at AI-Hypercomputer/maxtext@e591f30):
    micro_batch_size_to_train_on  = int(num_devices * per_device_batch_size)
    global_batch_size_to_train_on = int(micro_batch_size_to_train_on * gradient_accumulation_steps)
with num_devices every device of the run (all slices). So per_device_batch_size is the planned batch over
devices *and* accumulation steps; it may be fractional (MaxText then loads whole rows and trains on the
fraction). A pipeline's microbatches are not gradient accumulation: they split the one forward pass
(`num_pipeline_microbatches`, which MaxText requires to divide that pass's batch and to be a multiple of
the stages). The mesh: ici_* axes multiply to the devices of one slice, dcn_* axes to the slices;
codesign's `sequence` axis (context parallelism) is MaxText's `context` axis (`sequence` is not among
MaxText's default mesh_axes, so ici_sequence_parallelism would be ignored and the mesh would not close).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from codesign.config import ConfigError, ModelConfig
from codesign.hardware.catalog import Hardware
from codesign.sharding.strategy import Strategy

MAXTEXT_REF = "AI-Hypercomputer/maxtext@e591f30 (src/maxtext/configs/base.yml, types.py)"

_AXES = {
    "data": "data",
    "fsdp": "fsdp",
    "tensor": "tensor",
    "sequence": "context",
    "expert": "expert",
    "pipeline": "pipeline",
}
# codesign remat -> (MaxText remat_policy, why it is not exact; None when it is)
_REMAT = {
    "full": ("full", None),
    "full_layer": (
        "full",
        "MaxText's 'full' under XLA drops the recomputed FFN down-projection (dead code); full_layer reruns it",
    ),
    "dots_nobatch": (
        "minimal",
        (
            "codesign saves matmul outputs without batch dims; MaxText's 'minimal' "
            "saves the named projection outputs (q/k/v/out, MLP): the closest policy"
        ),
    ),
    "dots": (
        "minimal_with_context",
        (
            "codesign saves every matmul output; MaxText's 'minimal_with_context' "
            "(projections, attention context) is the closest"
        ),
    ),
    "none": (
        "minimal_with_context",
        (
            "codesign keeps every activation (no remat); MaxText has no policy "
            "that saves all: 'minimal_with_context' recomputes elementwise ops"
        ),
    ),
    # MaxText's own names: the same saved projections (codesign/_compat.py SAVED_NAMES).
    "minimal": ("minimal", None),
    "save_qkv_proj": ("save_qkv_proj", None),
    "save_dot_except_mlp": ("save_dot_except_mlp", None),
    "save_dot_except_mlpwi": ("save_dot_except_mlpwi", None),
    "offload": ("minimal_offloaded", None),
    "selective": (
        "minimal_with_context",
        (
            "Megatron's selective recompute keeps everything but the "
            "attention scores; MaxText's 'minimal_with_context' "
            "(projections and context) is the closest"
        ),
    ),
}
_ATTENTION = {"xla": "dot_product", "cudnn": "cudnn_flash_te"}
# codesign presets that are MaxText model configs of the same shapes (configs/models/<name>.yml)
_MODEL_NAMES = {
    "llama3-8b": "llama3-8b",
    "llama3.1-70b": "llama3.1-70b",
    "llama3.1-405b": "llama3.1-405b",
    "mixtral-8x7b": "mixtral-8x7b",
    "deepseek-v2": "deepseek2-236b",
    "deepseek-v3": "deepseek3-671b",
}


@dataclass(frozen=True)
class MaxTextExport:
    overrides: dict[str, Any]
    notes: tuple[str, ...]

    def to_text(self) -> str:
        """Comments first, then one `key=value` per line: append the values to MaxText's train command."""
        lines = [f"# {n}" for n in self.notes]
        lines += [f"{k}={_value(v)}" for k, v in self.overrides.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"overrides": dict(self.overrides), "notes": list(self.notes)}


def _value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def maxtext_global_batch(overrides: dict[str, Any], num_devices: int) -> int:
    """The batch MaxText trains on for these overrides (calculate_global_batch_sizes, mirrored)."""
    micro = int(num_devices * overrides["per_device_batch_size"])
    return int(micro * overrides.get("gradient_accumulation_steps", 1))


def _per_device_batch(rows: int, devices: int) -> int | float:
    """A per_device_batch_size with int(devices * it) == rows exactly (MaxText truncates the product)."""
    exact = Fraction(rows, devices)
    if exact.denominator == 1:
        return int(exact)
    value = float(exact)
    if int(devices * value) != rows:  # the float fell just below: take the next one up
        value = math.nextafter(value, math.inf)
    return value


def _ici_dcn(strategy: Strategy, hardware: Hardware) -> dict[str, tuple[int, int]]:
    """Per mesh axis: (devices inside one slice/node, slices/nodes across), from the network levels."""
    from codesign.cost.network import assign_levels

    hw = hardware if hardware.devices == strategy.n_devices else hardware.with_devices(strategy.n_devices)
    placements = assign_levels(strategy.mesh, hw)
    out = {}
    for axis, size in strategy.sizes.items():
        p = placements.get(axis)
        if size == 1 or p is None or not p.spans:
            out[axis] = (size, 1)
            continue
        inside = p.spans[0].size if p.level_indices[0] == 0 else 1  # only level 0 is MaxText's ICI
        out[axis] = (inside, size // inside)
    return out


def maxtext_export(plan, hardware: Hardware) -> MaxTextExport:
    """The chosen candidate of `plan` (a `Plan` or a loaded plan file) as MaxText overrides and notes."""
    best = (
        plan.best
        if hasattr(plan, "best")
        else (plan["candidates"][plan["chosen"]] if plan.get("chosen") is not None else None)
    )
    if best is None:
        raise ConfigError(
            "the plan has no candidate that fits; nothing to export (relax --strategy-filter or add devices)"
        )
    model = plan.model if hasattr(plan, "model") else plan["model"]
    workload = plan.workload if hasattr(plan, "workload") else plan["workload"]
    s = Strategy.parse(best["strategy"]["spec"])
    n, sizes = s.n_devices, s.sizes
    batch, stages = int(workload["global_batch"]), sizes["pipeline"]
    head = (
        f"codesign plan {s.spec} for {model['name']}, global batch {batch} x {workload['seq_len']} "
        f"tokens on {n} devices; keys checked against {MAXTEXT_REF}"
    )
    notes = [head]
    out: dict[str, Any] = {}
    name = _MODEL_NAMES.get(model["name"])
    if name and _same_as_preset(model):
        out["model_name"] = name
    else:
        notes.append(
            f"model: codesign's {model['name']!r} has no MaxText model config of the same shapes; "
            "add model_name=... or the base_* architecture keys"
        )

    split = _ici_dcn(s, hardware)
    for axis, mt_axis in _AXES.items():
        out[f"ici_{mt_axis}_parallelism"], _ = split[axis]
    for axis, mt_axis in _AXES.items():
        _, out[f"dcn_{mt_axis}_parallelism"] = split[axis]
    slices = math.prod(dcn for _, dcn in split.values())
    if slices > 1:
        out["num_slices"] = slices  # MaxText refuses dcn_* > 1 when it counts one slice (e.g. GPU nodes)

    if stages > 1:  # the microbatches feed the pipeline; one accumulation step
        accumulation = 1
        cfg = ModelConfig.from_json(model["config"]) if "config" in model else None
        out["num_pipeline_microbatches"] = s.microbatches
        if s.microbatches % stages or batch % s.microbatches:
            raise ConfigError(
                f"MaxText needs num_pipeline_microbatches ({s.microbatches}) to be a multiple "
                f"of the pipeline stages ({stages}) and to divide the batch ({batch}); pick a "
                f"plan with --fix microbatches={stages * 2}"
            )
        if cfg is not None:
            # MaxText pipelines the MoE layers of a DeepSeek-style model (dense prefix outside), else all.
            piped = cfg.moe_layers if cfg.is_moe and cfg.first_dense_layers else cfg.layers
            if piped % stages:
                raise ConfigError(
                    f"MaxText needs the pipeline stages ({stages}) to divide the {piped} "
                    f"pipelined layers of {cfg.name}; pick a plan with --strategy-filter "
                    "pipeline=1"
                )
            out["num_layers_per_pipeline_stage"] = piped // stages  # one repeat: codesign's stage order
    else:
        accumulation = s.microbatches
    rows = batch // accumulation  # rows in one forward pass, across all devices
    out["per_device_batch_size"] = _per_device_batch(rows, n)
    out["gradient_accumulation_steps"] = accumulation
    out["max_target_length"] = int(workload["seq_len"])
    policy, why = _REMAT[s.remat]
    out["remat_policy"] = policy
    if why:
        notes.append(f"remat: {why}")
    if s.sp:
        notes.append(
            "sp=1: MaxText shards the norm/residual activations over tensor by its "
            "logical_axis_rules (activation_norm_length -> tensor); no override key sets that, "
            "edit the rules"
        )
    attention = workload.get("attention", "xla")
    if attention == "flash":  # MaxText's "flash" is splash on TPU; on GPU its cuDNN kernel
        out["attention"] = "cudnn_flash_te" if hardware.platform == "gpu" else "flash"
    elif attention in _ATTENTION:
        out["attention"] = _ATTENTION[attention]
    out["dtype"] = workload.get("dtype", "bfloat16")
    out["weight_dtype"] = workload.get("param_dtype", "float32")
    if (hardware.platform == "gpu") and slices > 1:
        notes.append("GPU: run with hardware=gpu_multiprocess (one process per node)")

    trained = maxtext_global_batch(out, n)
    if trained != batch:  # a wrong batch would silently train a different run; never emit one
        raise ConfigError(
            f"cannot express global batch {batch} on {n} devices with {accumulation} "
            f"accumulation steps in MaxText (it would train {trained}); pick a batch divisible "
            "by them"
        )
    ici, dcn = (math.prod(v[i] for v in split.values()) for i in (0, 1))
    if ici * dcn != n:
        raise ConfigError(
            f"the mesh of {s.spec} does not split into ICI x DCN ({ici} x {dcn} != {n} devices)"
        )
    return MaxTextExport(overrides=out, notes=tuple(notes))


def _same_as_preset(model: dict[str, Any]) -> bool:
    """The plan's model is the preset of that name (not a YAML or HF config that reuses the name)."""
    from codesign.presets import get_preset

    if "config" not in model:
        return False
    try:
        return ModelConfig.from_json(model["config"]).fingerprint() == get_preset(model["name"]).fingerprint()
    except ConfigError:
        return False


def maxtext_overrides(plan, hardware: Hardware) -> dict[str, Any]:
    """Only the overrides (every key a MaxText config key); `maxtext_export` has the notes too."""
    return maxtext_export(plan, hardware).overrides

"""`plan --export maxtext`: overrides MaxText accepts, for the batch that was planned.

MaxText's batch (src/maxtext/configs/types.py, calculate_global_batch_sizes, maxtext@e591f30):
    global = int(int(num_devices * per_device_batch_size) * gradient_accumulation_steps)
The tests state that formula themselves rather than call the exporter's mirror of it.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from codesign.config import ConfigError
from codesign.hardware import load_hardware
from codesign.plan_file import Plan
from codesign.planner.export_maxtext import maxtext_export
from codesign.presets import get_preset

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "maxtext_base_keys.txt")


def _maxtext_keys() -> set[str]:
    with open(KEYS_FILE) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def _maxtext_trains(o: dict, devices: int) -> int:
    return int(int(devices * o["per_device_batch_size"]) * o.get("gradient_accumulation_steps", 1))


def _plan(model: str, spec: str, batch: int, seq: int = 2048, hw: str = "h100", devices: int = 16) -> tuple:
    cfg = get_preset(model)
    hardware = load_hardware(hw, devices=devices)
    plan = Plan(
        model={"name": cfg.name, "config": cfg.to_json()},
        hardware={"name": hw, "devices": devices, "memory_capacity_bytes": 1},
        workload={
            "global_batch": batch,
            "seq_len": seq,
            "mode": "train",
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "attention": "xla",
        },
        search={},
        candidates=[{"strategy": {"spec": spec}}],
        chosen=0,
    )
    return plan, hardware


CASES = [  # model, hardware, devices, spec, global batch
    ("llama3-8b", "h100", 16, "data=2,tensor=8,remat=full", 64),
    ("llama3-8b", "h100", 16, "fsdp=16,remat=full,microbatches=4", 64),  # the issue: 4x the batch before
    ("llama3.1-70b", "tpu-v5p", 256, "fsdp=64,tensor=4,remat=full,microbatches=4", 512),  # 0.5 per device
    ("tiny-dense", "cpu", 7, "tensor=7,remat=full", 61),  # float(61/7) * 7 = 60.99...: MaxText truncates
    ("tiny-dense", "cpu", 8, "fsdp=2,sequence=4,remat=dots", 8),
    ("mixtral-8x7b", "h100", 64, "expert=8,fsdp=2,tensor=4,remat=dots_nobatch,microbatches=2", 64),
    ("tiny-dense", "cpu", 8, "pipeline=2,fsdp=4,remat=full,microbatches=4", 8),
    ("deepseek-v3", "h800", 256, "pipeline=2,data=2,expert=64,remat=full,microbatches=8", 512),
]


@pytest.mark.parametrize("model,hw,devices,spec,batch", CASES)
def test_maxtext_trains_the_planned_batch_with_valid_keys(model, hw, devices, spec, batch):
    plan, hardware = _plan(model, spec, batch, hw=hw, devices=devices)
    ex = maxtext_export(plan, hardware)
    o = ex.overrides
    assert _maxtext_trains(o, devices) == batch, o
    assert set(o) <= _maxtext_keys(), sorted(set(o) - _maxtext_keys())
    assert not any(k.startswith("_") for k in o)
    # The mesh closes the way MaxText checks it: ici axes fill a slice, dcn axes the slices.
    ici = math.prod(v for k, v in o.items() if k.startswith("ici_"))
    dcn = math.prod(v for k, v in o.items() if k.startswith("dcn_"))
    assert ici * dcn == devices and o.get("num_slices", 1) == dcn
    assert o["max_target_length"] == 2048


def test_per_device_batch_survives_maxtexts_truncation():
    from codesign.planner.export_maxtext import _per_device_batch

    for devices in range(1, 65):
        for rows in range(1, 4 * devices + 1):
            assert int(devices * _per_device_batch(rows, devices)) == rows, (rows, devices)


def test_microbatches_are_accumulation_without_a_pipeline_and_pipeline_microbatches_with_one():
    plan, hw = _plan("llama3-8b", "fsdp=16,remat=full,microbatches=4", 64)
    o = maxtext_export(plan, hw).overrides
    assert o["gradient_accumulation_steps"] == 4 and o["per_device_batch_size"] == 1  # not 64/16 = 4
    plan, hw = _plan("tiny-dense", "pipeline=2,fsdp=4,remat=full,microbatches=4", 8, hw="cpu", devices=8)
    o = maxtext_export(plan, hw).overrides
    assert o["gradient_accumulation_steps"] == 1 and o["num_pipeline_microbatches"] == 4
    assert o["ici_pipeline_parallelism"] * o["dcn_pipeline_parallelism"] == 2
    assert o["num_layers_per_pipeline_stage"] == get_preset("tiny-dense").layers // 2


def test_axes_map_to_maxtext_names_and_levels():
    plan, hw = _plan("llama3-8b", "data=2,tensor=8,remat=full", 64)  # two 8-GPU nodes
    o = maxtext_export(plan, hw).overrides
    assert o["ici_tensor_parallelism"] == 8 and o["dcn_data_parallelism"] == 2 and o["num_slices"] == 2
    plan, hw = _plan("tiny-dense", "fsdp=2,sequence=4,remat=full", 8, hw="cpu", devices=8)
    o = maxtext_export(plan, hw).overrides
    assert o["ici_context_parallelism"] * o["dcn_context_parallelism"] == 4  # MaxText's context axis
    assert not any("sequence" in k for k in o)  # not in MaxText's mesh_axes: it would be dropped


def test_inexpressible_pipeline_is_refused_in_one_line():
    plan, hw = _plan("tiny-dense", "pipeline=2,fsdp=4,remat=full,microbatches=3", 6, hw="cpu", devices=8)
    with pytest.raises(ConfigError, match="num_pipeline_microbatches"):
        maxtext_export(plan, hw)
    plan, hw = _plan("llama3-8b", "pipeline=3,data=2,tensor=8,remat=full,microbatches=3", 48, devices=48)
    with pytest.raises(ConfigError, match="divide the 32 pipelined layers"):
        maxtext_export(plan, hw)


def test_deepseek_pipeline_counts_only_the_moe_layers():
    # MaxText pipelines a DeepSeek model's MoE layers; the dense prefix stays outside the pipeline.
    plan, hw = _plan(
        "deepseek-v3", "pipeline=2,data=2,expert=64,remat=full,microbatches=8", 512, hw="h800", devices=256
    )
    o = maxtext_export(plan, hw).overrides
    assert o["num_layers_per_pipeline_stage"] == (61 - 3) // 2 and o["model_name"] == "deepseek3-671b"


def test_notes_are_comments_and_the_text_is_key_value_lines():
    plan, hw = _plan("tiny-dense", "fsdp=8,remat=dots", 8, hw="cpu", devices=8)
    ex = maxtext_export(plan, hw)
    assert any("remat" in n for n in ex.notes)  # dots has no exact MaxText policy: said in a comment
    keys = _maxtext_keys()
    for line in ex.to_text().splitlines():
        if not line.startswith("# "):
            k, _, v = line.partition("=")
            assert k in keys and v, line


def test_model_name_only_for_a_preset_maxtext_also_defines():
    plan, hw = _plan("llama3-8b", "fsdp=16,remat=full", 64)
    assert maxtext_export(plan, hw).overrides["model_name"] == "llama3-8b"
    changed = get_preset("llama3-8b").replace(layers=16)
    plan.model = {"name": changed.name, "config": changed.to_json()}
    ex = maxtext_export(plan, hw)
    assert "model_name" not in ex.overrides and any("model_name" in n for n in ex.notes)


def test_vendored_key_list_names_its_source():
    with open(KEYS_FILE) as f:
        head = "".join(f.readline() for _ in range(6))
    assert "AI-Hypercomputer/maxtext" in head and "base.yml" in head
    keys = _maxtext_keys()
    assert {
        "per_device_batch_size",
        "gradient_accumulation_steps",
        "ici_fsdp_parallelism",
        "dcn_data_parallelism",
        "remat_policy",
        "max_target_length",
    } <= keys
    assert "_note" not in keys and "ici_sequence_parallelism" in keys  # a key, but not a default mesh axis


@pytest.mark.slow  # two CLI plans with compiles; the export itself is tested without compiling above
def test_cli_export_prints_comments_and_json_carries_notes():
    args = [
        sys.executable,
        "-m",
        "codesign",
        "plan",
        "--model",
        "tiny-dense",
        "--hardware",
        "cpu",
        "--devices",
        "8",
        "--target",
        "analytic",
        "--export",
        "maxtext",
    ]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    o, notes = doc["export"]["maxtext"], doc["export"]["maxtext_notes"]
    assert set(o) <= _maxtext_keys() and notes
    assert _maxtext_trains(o, 8) == doc["workload"]["global_batch"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    tail = out.stdout[out.stdout.index("MaxText overrides:") :].splitlines()[1:]
    assert "_note" not in out.stdout and any(line.startswith("# ") for line in tail)

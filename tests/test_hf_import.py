"""`--model config.json`: real Hugging Face configs against published parameter counts, model-type checks,
refusals that name the unsupported feature, and the Flax model honouring what the import reads."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codesign.arithmetic import param_counts
from codesign.config import ConfigError, ModelConfig
from codesign.model_io import from_hf_config, load_model_config
from codesign.models import build_abstract
from codesign.presets import get_preset, preset_names

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_configs")


def _path(name: str) -> str:
    return os.path.join(DATA, name + ".json")


def _raw(name: str) -> dict:
    with open(_path(name)) as f:
        return json.load(f)


def _load(name: str, **changes) -> ModelConfig:
    d = {**_raw(name), **changes}
    return from_hf_config({k: v for k, v in d.items() if v is not _DROP}, name)


_DROP = object()

# file, model_type, published total, published active, tolerance on the published figure, source.
# Tolerance: 1% or half a unit of the figure's last digit, whichever is larger ("37B" allows 36.5-37.5B).
# Active counts include the input embedding except where noted ("excl. emb").
PUBLISHED = [
    ("llama3.1-8b", "llama", 8.03e9, None, 0.005e9, "Llama 3.1 model card: 8.03B"),
    ("qwen2.5-72b", "qwen2", 72.7e9, None, 0.05e9, "Qwen2.5-72B model card: 72.7B"),
    (
        "mixtral-8x7b",
        "mixtral",
        46.7e9,
        12.9e9,
        0.05e9,
        "Mixtral of Experts (arXiv 2401.04088): 46.7B total, 12.9B active per token",
    ),
    (
        "deepseek-v3",
        "deepseek_v3",
        671e9,
        37e9,
        0.5e9,
        "DeepSeek-V3 technical report (arXiv 2412.19437): 671B total, 37B activated (excl. emb; MTP excluded)",
    ),
    (
        "qwen3-30b-a3b",
        "qwen3_moe",
        30.5e9,
        3.3e9,
        0.05e9,
        "Qwen3-30B-A3B model card: 30.5B in total, 3.3B activated (figures truncated, see below)",
    ),
    ("gemma-2-27b", "gemma2", 27.2e9, None, 0.05e9, "Gemma 2 (arXiv 2408.00118): the 27B model, 27.2B"),
    (
        "gemma-7b",
        "gemma",
        8.54e9,
        None,
        0.005e9,
        "Gemma (arXiv 2403.08295): 7B model, 786,825,216 embedding + 7,751,248,896 non-embedding = 8.54B",
    ),
    (
        "qwen2-57b-a14b",
        "qwen2_moe",
        57e9,
        14e9,
        0.5e9,
        "Qwen2 technical report (arXiv 2407.10671): Qwen2-57B-A14B, 57B total, 14B activated",
    ),
    (
        "qwen1.5-moe-a2.7b",
        "qwen2_moe",
        14.3e9,
        2.7e9,
        0.05e9,
        "Qwen1.5-MoE-A2.7B model card: 14.3B parameters in total, 2.7B activated",
    ),
    ("olmoe-1b-7b-0924", "olmoe", 6.9e9, 1.3e9, 0.05e9, "OLMoE (arXiv 2409.02060): 6.9B total, 1.3B active"),
]
EXCLUDES_EMBEDDING = {"deepseek-v3"}  # DeepSeek's 37B leaves out the input embedding (36.6B; 37.55B with it)
# Qwen3's card truncates: our exact 3,353,020,416 active is "3.3B" (and 29,909,780,480 non-embedding is its
# "29.9B"), so its figures are checked as [published, published + one unit of the last digit).
TRUNCATED = {"qwen3-30b-a3b"}


def _close(ours: float, published: float, half_unit: float, truncated: bool) -> bool:
    if truncated:
        return published - 0.01 * published <= ours < published + 2 * half_unit
    return abs(ours - published) <= max(0.01 * published, half_unit)


@pytest.mark.parametrize(
    "name,model_type,total,active,half_unit,source", PUBLISHED, ids=[p[0] for p in PUBLISHED]
)
def test_params_match_published(name, model_type, total, active, half_unit, source):
    assert _raw(name)["model_type"] == model_type
    cfg = load_model_config(_path(name))
    pc = param_counts(cfg)
    assert _close(pc.total, total, half_unit, name in TRUNCATED), (source, pc.total)
    if active is not None:
        ours = pc.active - (pc.embedding if name in EXCLUDES_EMBEDDING else 0)
        assert _close(ours, active, half_unit, name in TRUNCATED), (source, ours)
        assert cfg.is_moe and pc.active < 0.35 * pc.total
    else:
        assert not cfg.is_moe and pc.active == pc.total


def test_exact_published_counts():
    # Hugging Face safetensors totals of the real checkpoints.
    assert param_counts(load_model_config(_path("llama3.1-8b"))).total == 8_030_261_248
    assert param_counts(load_model_config(_path("mixtral-8x7b"))).total == 46_702_792_704
    # Gemma 2 paper, parameter-count table: the 27B model's non-embedding parameters, 26,047,480,320.
    # codesign leaves out the post-attention and post-FFN norm scales (2 x hidden per layer), and says so.
    gemma = load_model_config(_path("gemma-2-27b"))
    pc = param_counts(gemma)
    left_out = 2 * gemma.hidden * gemma.layers
    assert pc.total - pc.embedding - pc.lm_head + left_out == 26_047_480_320
    assert any(f"{left_out:,} parameters" in n for n in gemma.notes)
    # Gemma paper, parameter-count table: the 7B model's non-embedding parameters (no sandwich norms: exact).
    g7 = param_counts(load_model_config(_path("gemma-7b")))
    assert g7.total - g7.embedding - g7.lm_head == 7_751_248_896 and g7.lm_head == 0  # tied
    qwen = param_counts(load_model_config(_path("qwen3-30b-a3b")))  # card: 29.9B non-embedding
    assert 29.9e9 <= qwen.total - qwen.embedding - qwen.lm_head < 30.0e9


def test_the_issue_configs_are_no_longer_read_as_llamas():
    qwen = load_model_config(_path("qwen3-30b-a3b"))  # was: a dense 3.34B model
    moe = (qwen.n_routed_experts, qwen.experts_per_token, qwen.moe_mlp_dim, qwen.moe_layers)
    assert moe == (128, 8, 768, 48)
    gemma = load_model_config(_path("gemma-2-27b"))  # was: 28.41B, untied, SiLU
    assert gemma.tie_embeddings and gemma.ffn_gate_activation == "gelu" and gemma.head_dim == 128
    assert any("soft-capping" in n for n in gemma.notes)
    assert any("sliding-window" in n and "4096" in n for n in gemma.notes)


def test_falcon_mamba_is_refused_by_model_type():
    with pytest.raises(
        ConfigError,
        match=r"^model_type falcon_mamba \(state-space\) is not supported; "
        r"supported: llama, mistral, qwen2",
    ):
        load_model_config(_path("falcon-mamba-7b"))


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"model_type": "gpt_neox"}, "model_type gpt_neox is not supported; supported: llama"),
        ({"model_type": "jamba"}, "model_type jamba (hybrid attention/state-space) is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"model_type": _DROP, "architectures": _DROP}, "no model_type or architectures"),
        ({"model_type": _DROP, "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"hidden_act": "relu"}, "FFN activation 'relu' is not supported"),
        ({"hidden_size": "4096"}, "hidden_size='4096' must be a non-negative integer"),
        ({"num_attention_heads": _DROP}, "lacks 'num_attention_heads'"),
    ],
)
def test_llama_config_faults_are_one_line_errors(changes, needle):
    with pytest.raises(ConfigError) as e:
        _load("llama3.1-8b", **changes)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_architectures_alone_identify_the_family():
    inferred = _load("qwen2.5-72b", model_type=_DROP)
    assert inferred.qkv_bias and param_counts(inferred).total == param_counts(_load("qwen2.5-72b")).total


@pytest.mark.parametrize(
    "name,changes,needle",
    [
        ("qwen3-30b-a3b", {"decoder_sparse_step": 2}, "dense FFN layers [2, 4, 6, 8]... between MoE layers"),
        ("qwen3-30b-a3b", {"mlp_only_layers": [10]}, "dense FFN layers [10] between MoE layers"),
        ("qwen3-30b-a3b", {"mlp_only_layers": list(range(48))}, "no layer is an MoE layer"),
        ("qwen2-57b-a14b", {"shared_expert_intermediate_size": 5000}, "shared_expert_intermediate_size=5000"),
        ("deepseek-v3", {"moe_layer_freq": 2}, "between MoE layers"),
        ("deepseek-v3", {"scoring_func": "sparsemixer"}, "scoring_func='sparsemixer'"),
        ("mixtral-8x7b", {"hidden_act": "gelu"}, "MoE experts are SwiGLU only"),
    ],
)
def test_unsupported_features_are_refused_by_name(name, changes, needle):
    with pytest.raises(ConfigError) as e:
        _load(name, **changes)
    msg = str(e.value)
    assert needle in msg and msg.startswith(f"model_type {_raw(name)['model_type']} ") and "\n" not in msg


def test_dense_prefix_of_an_moe_model_is_built():
    base = _load("qwen3-30b-a3b")
    two_dense = _load("qwen3-30b-a3b", mlp_only_layers=[0, 1])
    assert (two_dense.first_dense_layers, two_dense.mlp_dim) == (2, 6144)
    ffn = 3 * base.hidden
    moe_layer = base.hidden * 128 + 128 * ffn * 768
    assert param_counts(two_dense).total - param_counts(base).total == 2 * (ffn * 6144 - moe_layer)


def test_qwen2_moe_shared_expert_is_its_width_in_expert_units():
    cfg = load_model_config(_path("qwen2-57b-a14b"))
    assert cfg.n_shared_experts * cfg.moe_mlp_dim == 20480 and cfg.qkv_bias


def test_notes_say_what_is_left_out_and_are_logged(caplog):
    assert load_model_config(_path("llama3.1-8b")).notes == ()
    with caplog.at_level(logging.WARNING, logger="codesign.model_io"):
        ds = load_model_config(_path("deepseek-v3"))
    assert any("multi-token-prediction" in n for n in ds.notes)
    assert any("multi-token-prediction" in r.getMessage() for r in caplog.records)
    olmoe = load_model_config(_path("olmoe-1b-7b-0924"))
    assert any("QK-norm" in n for n in olmoe.notes) and any("norm_topk_prob" in n for n in olmoe.notes)


def test_config_json_takes_its_name_from_the_hub_path(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**_raw("qwen3-30b-a3b"), "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    assert load_model_config(str(p)).name == "Qwen3-30B-A3B"
    p.write_text(json.dumps({**_raw("llama3.1-8b"), "_name_or_path": "./"}))
    assert load_model_config(str(p)).name == "llama"


def test_notes_and_defaults_leave_fingerprints_alone():
    for name in preset_names():
        fp = get_preset(name).fingerprint()
        assert "ffn_gate_activation" not in fp and "notes" not in fp  # existing cache keys unchanged
    gemma = load_model_config(_path("gemma-2-27b"))
    assert gemma.replace(notes=()).fingerprint() == gemma.fingerprint()
    assert gemma.replace(ffn_gate_activation="silu").fingerprint() != gemma.fingerprint()
    assert ModelConfig.from_json(json.loads(json.dumps(gemma.to_json()))) == gemma


@pytest.mark.parametrize("name", ["gemma-2-27b", "qwen3-30b-a3b", "qwen2-57b-a14b"])
def test_flax_model_matches_the_closed_form(name):
    cfg = load_model_config(_path(name))
    model = build_abstract(cfg)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == param_counts(cfg).total
    assert hasattr(model, "lm_head") != cfg.tie_embeddings


def test_geglu_gate_is_gelu():
    from codesign.models.layers import MLP

    cfg = get_preset("tiny-dense").replace(ffn_gate_activation="gelu")
    with nnx.use_eager_sharding(False):
        mlp = MLP(cfg, cfg.mlp_dim, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 4, cfg.hidden))
    wg, wu, wd = (np.asarray(p[...]) for p in (mlp.w_gate, mlp.w_up, mlp.w_down))
    want = (jax.nn.gelu(x @ wg) * (x @ wu)) @ wd
    other = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
    np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, other, atol=1e-4)


def test_cli_refuses_an_unsupported_config_in_one_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "codesign",
            "plan",
            "--model",
            _path("falcon-mamba-7b"),
            "--hardware",
            "cpu",
            "--devices",
            "8",
            "--target",
            "analytic",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "model_type falcon_mamba (state-space) is not supported" in lines[0]

"""Flash attention on every target (`--attention flash|auto`): which kernel each platform runs, the
CPU reference path's numerics and losses against XLA attention (dense and MLA, under a tensor and a
data layout), the HLO walk's count of the Pallas splash custom call, and the closed form's memory
without the S x S scores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codesign.closed_form import analytic_memory, analytic_report
from codesign.closed_form.program import Shape, _attention_core, shape_of
from codesign.compile.hlo import analyze_hlo
from codesign.compile.hlo_parse import parse_module
from codesign.config import ConfigError, Workload, resolve_attention
from codesign.models.attention import causal_attention, flash_flops, kernel_for
from codesign.presets import get_preset
from codesign.sharding.mesh import MeshSpec
from codesign.sharding.strategy import Strategy
from codesign.train_step import TrainProgram
from tests.conftest import require_devices, train_losses


def test_auto_and_flash_resolve_per_platform():
    assert [resolve_attention("auto", p) for p in ("gpu", "tpu", "cpu")] == ["flash", "flash", "xla"]
    assert [kernel_for("flash", p) for p in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "reference"]
    assert kernel_for("xla", "tpu") == "xla" and kernel_for("cudnn", "gpu") == "cudnn"
    with pytest.raises(ConfigError, match="--attention 'splash'"):
        resolve_attention("splash", "tpu")
    assert Workload(attention="flash").flash and not Workload(attention="xla").flash


# CI keeps the GQA case; MLA's narrower v (a second XLA:CPU compile of the blockwise kernel) is slow.
@pytest.mark.parametrize(
    "hq,hv,heads,kv_heads", [(16, 16, 8, 4), pytest.param(24, 16, 8, 8, marks=pytest.mark.slow)]
)  # GQA; MLA's narrower v
def test_reference_path_matches_xla_attention_and_its_gradients(hq, hv, heads, kv_heads, monkeypatch):
    from codesign.models import attention

    monkeypatch.setattr(attention, "_REFERENCE_BLOCK", 16)  # several K/V blocks, so the online softmax runs
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (2, 64, heads, hq))
    k = jax.random.normal(ks[1], (2, 64, kv_heads, hq))
    v = jax.random.normal(ks[2], (2, 64, kv_heads, hv))

    def loss(kernel):
        return lambda q, k, v: jnp.sum(causal_attention(q, k, v, kernel) ** 2)

    np.testing.assert_allclose(
        causal_attention(q, k, v, "reference"), causal_attention(q, k, v, "xla"), atol=2e-5
    )
    for g_ref, g_xla in zip(
        jax.grad(loss("reference"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)
    ):
        np.testing.assert_allclose(g_ref, g_xla, atol=5e-5)


def _losses(cfg, attention: str, spec: str, steps: int = 2) -> list[float]:
    s = Strategy.parse(spec)
    wl = Workload(global_batch=8, seq_len=32, dtype="float32", attention=attention)
    prog = TrainProgram(cfg, wl, s, MeshSpec.from_strategy(s).build(jax.devices()[:8]))
    assert prog.attention_impl == ("reference" if attention == "flash" else "xla")
    return train_losses(prog, prog.lower().compile(), steps)


@pytest.mark.slow  # 5-8 min each at load 4 (the blockwise kernel trained on XLA:CPU); the gradient test stays in CI
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-mla"])
def test_flash_reference_path_trains_like_xla_attention(preset):
    """Same model, data and seed: the flash path (CPU reference) under a tensor and a data layout gives
    XLA attention's losses (fp32), two steps, so the gradients agree too."""
    require_devices(8)
    cfg = get_preset(preset)
    ref = _losses(cfg, "xla", "data=8")
    for spec in ("data=4,tensor=2", "data=8"):
        np.testing.assert_allclose(_losses(cfg, "flash", spec), ref, rtol=2e-5, err_msg=spec)


def test_closed_form_memory_drops_the_scores_with_flash():
    cfg = get_preset("llama3-8b")
    wl = Workload(global_batch=16, seq_len=8192)
    fl = dataclasses.replace(wl, attention="flash")
    for remat in ("none", "full"):
        s = Strategy.parse(f"fsdp=8,tensor=2,remat={remat}")
        xla, flash = analytic_memory(cfg, wl, s), analytic_memory(cfg, fl, s, platform="tpu")
        b, heads, seq = 16 / 8, cfg.heads / 2, 8192
        scores = b * seq * heads * seq * 6  # f32 scores + bf16 probabilities of one layer
        lse = b * seq * heads * 4  # the kernel's logsumexp per query per head
        layers_kept = cfg.layers if remat == "none" else 0
        assert xla.saved_activations - flash.saved_activations == pytest.approx(
            layers_kept * (scores - lse), rel=1e-9
        )
        lanes = b * seq * heads * 128 * 4  # splash writes its logsumexp across 128 f32 lanes
        if remat == "full":  # the recomputed layer's scores (6 B each, 10 in softmax backward) are gone
            assert xla.attention_workspace >= scores
            assert xla.layer_phase - flash.layer_phase >= scores - lanes
        else:  # remat none keeps the scores among the saved activations: no workspace of their own
            assert xla.attention_workspace == 0.0
        assert flash.attention_workspace == pytest.approx(lanes)
        assert flash.total < xla.total


def test_closed_form_counts_the_causal_tiles_and_the_padded_mla_value_head():
    """XLA computes every score; a flash kernel about half at long sequence (the causal tiles), with a
    5-dot backward and the forward recomputed under remat. cuDNN pads MLA's value head; splash not."""
    cfg = get_preset("deepseek-v3")
    assert (cfg.qk_head_dim, cfg.attn_v_head_dim) == (192, 128)
    wl = Workload(global_batch=8, seq_len=8192)
    s = Strategy.parse("fsdp=8,remat=full")
    sh: Shape = shape_of(cfg, wl, s)
    xla = _attention_core(cfg, wl, "full", sh, "tpu")
    fl = dataclasses.replace(wl, attention="flash")
    splash, cudnn = _attention_core(cfg, fl, "full", sh, "tpu"), _attention_core(cfg, fl, "full", sh, "gpu")
    per = 2 * sh.b * cfg.heads * sh.s * sh.seq
    assert xla == pytest.approx(4 * per * (192 + 128))  # forward, backward (2x) and the recompute
    tiles = (16 + 1) / (2 * 16)  # 8192 / 512-blocks: 16 x 16 tiles, 136 of them causal
    assert splash == pytest.approx(per * tiles * (2 * (192 + 128) + 3 * 192 + 2 * 128))
    assert cudnn == pytest.approx(per * (64 + 1) / 128 * (2 * (192 + 192) + 5 * 192))
    hlo = analytic_report(cfg, fl, s, platform="tpu").matmul_flops
    assert hlo < analytic_report(cfg, wl, s, platform="tpu").matmul_flops


# One layer's splash forward and fused backward as the TPU compiler prints them (libtpu 0.0.52, jax
# 0.10.2; batch 8 vmapped, 4 query heads, 2 K/V heads, T = S = 1024, blocks of 512; the kernel body
# elided): the kernel's metadata spans several lines.
_SPLASH_HLO = """HloModule jit__step, entry_computation_layout={()->f32[]}, num_partitions=1

ENTRY %main.1 (q.1: bf16[8,4,1024,128], k.1: bf16[8,2,1024,128], v.1: bf16[8,2,1024,128]) -> bf16[8,4,1024,128] {
  %q.1 = bf16[8,4,1024,128]{3,2,1,0} parameter(0)
  %k.1 = bf16[8,2,1024,128]{3,2,1,0} parameter(1)
  %v.1 = bf16[8,2,1024,128]{3,2,1,0} parameter(2)
  %m.1 = s8[1,1,1]{2,1,0} constant({...})
  %iota.1 = s32[1024,128]{1,0} iota(), iota_dimension=0
  %splash_mha_fwd_residuals.17 = (f32[8,512,128]{2,1,0:T(8,128)}, f32[8,512,128]{2,1,0:T(8,128)}, f32[8,512,128]{2,1,0:T(8,128)}, bf16[8,4,1024,128]{3,2,1,0:T(8,128)(2,1)}, f32[8,4,1024,128]{3,2,1,0:T(8,128)}) custom-call(%m.1, %m.1, %q.1, %k.1, %v.1, /*index=5*/%iota.1), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]{2,1,0}, s8[1,1,1]{2,1,0}, bf16[8,4,1024,128]{3,2,1,0}, bf16[8,2,1024,128]{3,2,1,0}, bf16[8,2,1024,128]{3,2,1,0}, s32[1024,128]{1,0}}, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 512, \\"block_kv\\": 512, \\"block_kv_compute\\": 512, \\"block_q_dkv\\": 512, \\"block_kv_dkv\\": 512, \\"block_kv_dkv_compute\\": 512, \\"block_q_dq\\": null, \\"block_kv_dq\\": null, \\"use_fused_bwd_kernel\\": true, \\"q_layout\\": 1, \\"k_layout\\": 1, \\"v_layout\\": 1}"
}}, metadata={op_name="jit(_step)/splash_mha_fwd_residuals/pallas_call"}, backend_config={"custom_call_config":{"body":"TUzvUgFNTElS"}}
  %o.1 = bf16[8,4,1024,128]{3,2,1,0} get-tuple-element(%splash_mha_fwd_residuals.17), index=3
  %lse.1 = f32[8,4,8,1024]{3,2,1,0} broadcast(%q.1), dimensions={}
  %splash_mha_dkv_no_residuals.10 = (f32[8,512,128]{2,1,0:T(8,128)}, f32[8,512,128]{2,1,0:T(8,128)}, bf16[8,1,4,1024,128]{4,3,2,1,0:T(8,128)(2,1)}, bf16[8,2,1024,128]{3,2,1,0:T(8,128)(2,1)}, bf16[8,2,1024,128]{3,2,1,0:T(8,128)(2,1)}) custom-call(%m.1, %m.1, %q.1, %k.1, %v.1, /*index=5*/%lse.1, %o.1, %lse.1, %iota.1), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q_dkv\\": 512, \\"block_kv_dkv\\": 512, \\"block_kv_dkv_compute\\": 512, \\"q_layout\\": 1, \\"k_layout\\": 1, \\"v_layout\\": 1}"
}}, metadata={op_name="jit(_step)/splash_mha_dkv_no_residuals/pallas_call"}, backend_config={"custom_call_config":{"body":"TUzvUgFNTElS"}}
  ROOT %dq.1 = bf16[8,4,1024,128]{3,2,1,0} get-tuple-element(%splash_mha_dkv_no_residuals.10), index=2
}
"""


def test_hlo_walk_counts_the_splash_kernel_from_its_shapes():
    assert parse_module(_SPLASH_HLO).skipped_lines == 0  # the multi-line kernel metadata is joined
    stats = analyze_hlo(_SPLASH_HLO)
    fwd, bwd = flash_flops("splash", 8 * 4, 1024, 1024, 128, 128)
    per = 2 * 32 * 1024 * 1024 * 0.75  # 2 x 2 tiles of 512, 3 causal
    assert (fwd, bwd) == (per * 256, per * 640)
    assert stats.matmul_flops == pytest.approx(fwd + bwd)
    # A kernel's bytes are its operands and results (q, k, v read; o and the lane-wide lse written; ...)
    q = 8 * 4 * 1024 * 128 * 2
    assert stats.matmul_bytes >= 2 * (q + 2 * q / 2) + q + 4 * q


@pytest.mark.tpu
@pytest.mark.slow
def test_deviceless_tpu_compile_runs_the_splash_kernel_and_counts_it(tmp_path):
    """Deviceless v5e compile (one chip) of a 1-layer d128 model with 128-wide heads at seq 1024:
    the step holds the splash custom calls, and the HLO walk's count of them (the walk with and
    without the kernels recognized) is the closed form's attention FLOPs. Measured with libtpu 0.0.52:
    equal (5.64 GFLOP); about 4 minutes to compile on a loaded 2-core machine."""
    pytest.importorskip("libtpu")
    from codesign.compile.targets import compile_candidate
    from codesign.config import ModelConfig
    from codesign.hardware import load_hardware

    cfg = ModelConfig(
        name="d128", vocab_size=512, hidden=128, layers=1, heads=2, kv_heads=1, head_dim=128, mlp_dim=256
    )
    w, s = Workload(global_batch=2, seq_len=1024, attention="flash"), Strategy.parse("data=1,remat=none")
    hlo = tmp_path / "step.hlo"
    rep = compile_candidate(cfg, w, s, load_hardware("tpu-v5e", devices=1), "tpu", save_hlo=str(hlo))
    text = hlo.read_text()
    assert rep.outcome == "ok", rep.message
    assert "tpu_custom_call" in text and "splash_mha_fwd" in text
    counted = (
        analyze_hlo(text, s.mesh).matmul_flops
        - analyze_hlo(text.replace("splash_m", "kernel_m"), s.mesh).matmul_flops
    )
    closed = _attention_core(cfg, w, "none", shape_of(cfg, w, s), "tpu")
    assert counted == pytest.approx(closed, rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=2,tensor=2,sequence=2", "data=2,tensor=4"])
def test_splash_wrapper_matches_xla_attention_under_the_mesh(spec, monkeypatch):
    """The TPU path's shard_map around the splash kernel, run by Pallas' interpreter on 8 CPU devices:
    batch, heads and (context parallelism) the query sequence split over the mesh, K/V gathered, the
    causal mask split into q_seq_shards; tensor=4 with 2 K/V heads repeats K/V per query head. Output
    and gradients equal XLA attention's. About 50-140 s each on a loaded 2-core machine."""
    require_devices(8)
    import functools

    from codesign import _compat as C
    from codesign.sharding.activation import activation_sharding
    from codesign.sharding.rules import default_rules

    kernel_module, _ = C._splash_modules()
    monkeypatch.setattr(
        kernel_module, "make_splash_mha", functools.partial(kernel_module.make_splash_mha, interpret=True)
    )
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (2, 256, 4, 32))
    k, v = (jax.random.normal(key, (2, 256, 2, 32)) for key in ks[1:])

    def loss(kernel):
        return lambda q, k, v: jnp.sum(causal_attention(q, k, v, kernel) ** 2)

    s = Strategy.parse(spec)
    mesh = MeshSpec.from_strategy(s).build(jax.devices()[:8])
    with C.use_mesh(mesh), activation_sharding(mesh, default_rules(s)):
        out = jax.jit(lambda q, k, v: causal_attention(q, k, v, "splash"))(q, k, v)
        grads = jax.jit(jax.grad(loss("splash"), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, causal_attention(q, k, v, "xla"), atol=2e-5)
    for g, ref in zip(grads, jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, ref, atol=5e-5)

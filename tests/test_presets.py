"""Preset parameter counts against the published figures, and the abstract model against the closed form."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

from codesign.arithmetic import param_counts
from codesign.models import build_abstract
from codesign.presets import get_preset, preset_names

PUBLISHED = [n for n in preset_names() if get_preset(n).published_params_total]


@pytest.mark.parametrize("name", PUBLISHED)
def test_total_params_match_published(name):
    cfg = get_preset(name)
    ours = param_counts(cfg).total
    tol = max(0.01 * cfg.published_params_total, cfg.published_rounding)
    assert abs(ours - cfg.published_params_total) <= tol, (name, ours, cfg.published_params_total)


@pytest.mark.parametrize("name", PUBLISHED)
def test_active_params_match_published(name):
    cfg = get_preset(name)
    pc = param_counts(cfg)
    ours = pc.active - (pc.embedding if cfg.published_active_excludes_embedding else 0)
    tol = max(0.01 * cfg.published_params_active, cfg.published_rounding)
    assert abs(ours - cfg.published_params_active) <= tol, (name, ours, cfg.published_params_active)


def test_moe_active_is_a_fraction_of_total():
    for name in ("mixtral-8x7b", "deepseek-v2", "deepseek-v3"):
        pc = param_counts(get_preset(name))
        assert pc.active < 0.3 * pc.total


@pytest.mark.parametrize("name", preset_names())
def test_abstract_model_matches_closed_form(name):
    cfg = get_preset(name)
    state = nnx.state(build_abstract(cfg))
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(x.size for x in leaves) == param_counts(cfg).total


def test_every_param_names_logical_axes():
    from codesign.axes import ALL_AXES
    from codesign.sharding.params import logical_axes

    for name in ("deepseek-v3", "tiny-moe", "gpt3-175b"):
        state = nnx.state(build_abstract(get_preset(name)))
        shapes = nnx.to_pure_dict(state)
        axes = logical_axes(state)
        for a, s in zip(
            jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)
        ):
            assert len(a) == len(s.shape)
            assert all(n is None or n in ALL_AXES for n in a)


def test_deepseek_v3_abstract_state_is_cheap():
    """Abstract construction of the 671B model: seconds, and peak RSS under 2 GB (fresh process).

    Peak RSS is VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still reports the (large) pytest
    parent's high-water mark.
    """
    code = (
        "import os, time, json; os.environ['JAX_PLATFORMS']='cpu'\n"
        "t=time.time()\n"
        "from codesign.presets import get_preset\n"
        "from codesign.models import build_abstract\n"
        "t0=time.time(); m=build_abstract(get_preset('deepseek-v3')); dt=time.time()-t0\n"
        "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'s': dt, 'rss_mb': int(hwm)/1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["s"] < 30
    assert res["rss_mb"] < 2048

"""Every loader of user input gives a result or one of the project's user errors, never another exception.

Property-based (hypothesis): random strategy specs, YAML documents (hardware profiles, `rules=` tables),
plan files and arbitrary bytes. The CLI prints exactly these error types as one line with exit status 2
(`codesign.cli.user_error_types`), so "no other exception" here means "no traceback" there.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import math
import os
import pathlib
import tempfile
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codesign.axes import ALL_AXES, MESH_AXES
from codesign.cli import user_error_types
from codesign.hardware import load_hardware
from codesign.hardware.catalog import Hardware
from codesign.plan_file import PLAN_SCHEMA, chosen_candidate, load_plan
from codesign.sharding.rules import Rules
from codesign.sharding.strategy import Strategy
from codesign.userfiles import finite_json

USER_ERRORS = user_error_types()
PKG = pathlib.Path(__file__).resolve().parent.parent / "codesign"
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# On a failure hypothesis's pytest plugin imports its patch writer, which imports libcst, whose
# DeprecationWarning (an error under this suite's filterwarnings) turns the report of the failing example
# into an INTERNALERROR. Importing it once here, warnings silenced, keeps failures readable.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

# JSON/YAML-like values, including the awkward ones: NaN, infinities, huge ints, empty containers.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from([0, -1, 1, 8, 2**70, float("nan"), float("inf"), "", "bf16", "torus"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _write(data: bytes | str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def _call(fn, *args, **kw):
    """fn's result, or None when it raised one of the project's user errors; anything else propagates."""
    try:
        return fn(*args, **kw)
    except USER_ERRORS as e:
        assert str(e).strip() and "\n" not in str(e).strip(), f"not a one-line message: {e!r}"
        return None


def _set(doc, path: list, value):
    """A copy of `doc` with the element at `path` (keys/indices; clipped to what exists) replaced."""
    doc = json.loads(json.dumps(doc))
    node, parent, key = doc, None, None
    for step in path:
        if isinstance(node, dict) and node:
            k = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            k = step % len(node)
        else:
            break
        parent, key, node = node, k, node[k]
    if parent is None:
        return value
    parent[key] = value
    return doc


# -- strategy specs ---------------------------------------------------------------------------------------
spec_items = st.tuples(
    st.sampled_from(list(MESH_AXES) + ["remat", "microbatches", "order", "rules", "x", ""]),
    st.one_of(
        st.integers(-3, 70).map(str),
        st.text(max_size=10),
        st.sampled_from(["full", "none", "dots", "data.fsdp", "tensor.tensor"]),
    ),
)


@SETTINGS
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(spec_items, max_size=6).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
    )
)
def test_strategy_spec_parses_or_raises_a_user_error(spec):
    s = _call(Strategy.parse, spec)
    if s is not None:  # what parses round-trips
        assert Strategy.parse(s.spec) == s


# -- hardware profiles --------------------------------------------------------------------------------------
VALID_PROFILE = load_hardware("h100", devices=16).to_json()


@SETTINGS
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), values)
def test_hardware_profile_with_one_field_changed_loads_or_raises_a_user_error(path, value):
    doc = _set(VALID_PROFILE, path, value)
    for text in (yaml.safe_dump(doc), json.dumps(doc)):  # NaN written both ways
        f = _write(text, ".yaml")
        try:
            hw = _call(load_hardware, f)
            if hw is not None:
                assert isinstance(hw, Hardware)
                _call(load_hardware, f, devices=8)  # sizing the network must not crash either
                # What loaded is finite, so the cost model never divides by a string or a NaN.
                assert all(math.isfinite(v) for v in hw.peak_flops.values())
                assert all(math.isfinite(lv.bytes_per_s) for lv in hw.levels)
        finally:
            os.unlink(f)


@SETTINGS
@given(st.one_of(values.map(yaml.safe_dump), st.text(max_size=200), st.binary(max_size=200)))
def test_hardware_profile_from_arbitrary_documents_and_bytes(data):
    f = _write(data, ".yaml")
    try:
        _call(load_hardware, f)
    finally:
        os.unlink(f)


def test_hardware_profile_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "hw.yaml"
    f.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nkind: system\n")
    with pytest.raises(USER_ERRORS, match=r"hw\.yaml.*tag.*python.*remove the tag"):
        load_hardware(str(f))
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,needle",
    [
        ("name: x\npeak_flops: {bf16: 1e12\n", r"not valid YAML line \d+ column \d+"),
        (b"\xff\xfe\x00\x80", "not UTF-8"),
        ("- just\n- a list\n", "holds a list, not a mapping"),
        ("date: 2024-13-45\n", "value YAML cannot read"),
    ],
)
def test_hardware_profile_errors_name_the_file_and_the_fix(tmp_path, text, needle):
    f = tmp_path / "my_gpu.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(USER_ERRORS, match=needle) as e:
        load_hardware(str(f))
    assert "my_gpu.yaml" in str(e.value)


# -- rules files ----------------------------------------------------------------------------------------------
rule_rows = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(sorted(ALL_AXES) + ["nope"]),
            st.one_of(
                st.none(),
                st.sampled_from(list(MESH_AXES) + ["bogus"]),
                st.lists(st.sampled_from(MESH_AXES), max_size=3),
            ),
        ).map(list),
        values,
    ),
    max_size=6,
)


@SETTINGS
@given(
    st.one_of(
        rule_rows.map(yaml.safe_dump),
        values.map(yaml.safe_dump),
        st.text(max_size=120),
        st.binary(max_size=120),
    )
)
def test_rules_file_loads_or_raises_a_user_error(data):
    f = _write(data, ".yaml")
    try:
        rules = _call(Rules.from_file, f)
        if rules is not None:  # a table that loaded resolves an array (or says why not, strictly)
            _call(rules.resolve, ("embed", "mlp"), (64, 128), {"fsdp": 2, "tensor": 2})
    finally:
        os.unlink(f)


def test_rules_file_python_tag_is_refused(tmp_path):
    f = tmp_path / "rules.yaml"
    f.write_text("- [embed, !!python/name:os.system fsdp]\n")
    with pytest.raises(USER_ERRORS, match=r"rules\.yaml.*tag"):
        Rules.from_file(str(f))


# -- plan files ---------------------------------------------------------------------------------------------
VALID_PLAN = {
    "schema": PLAN_SCHEMA,
    "model": {"name": "tiny-dense"},
    "hardware": {"name": "cpu", "devices": 8},
    "workload": {
        "mode": "train",
        "global_batch": 8,
        "seq_len": 32,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "attention": "xla",
    },
    "search": {},
    "chosen": 0,
    "explanation": [],
    "candidates": [
        {
            "rank": 1,
            "strategy": {"spec": "fsdp=8,remat=full", "mesh": {"fsdp": 8}},
            "fits": True,
            "step_time_s": 0.01,
        },
        {
            "rank": 2,
            "strategy": {"spec": "data=8,remat=full", "mesh": {"data": 8}},
            "fits": True,
            "step_time_s": 0.02,
        },
    ],
}


def _read_plan_like_train(path: str):
    """What train/validate/compile do with a plan file before anything runs."""
    from codesign.train.trainer import resolve_layout

    data = load_plan(path)
    chosen_candidate(data)
    return resolve_layout("tiny-dense", plan=path)


@SETTINGS
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), values)
def test_plan_file_with_one_field_changed_loads_or_raises_a_user_error(path, value):
    doc = _set(VALID_PLAN, path, value)
    f = _write(json.dumps(doc), ".json")
    try:
        _call(_read_plan_like_train, f)
    finally:
        os.unlink(f)


@SETTINGS
@given(st.one_of(values.map(json.dumps), st.text(max_size=200), st.binary(max_size=200)))
def test_plan_file_from_arbitrary_documents_and_bytes(data):
    f = _write(data, ".json")
    try:
        _call(_read_plan_like_train, f)
    finally:
        os.unlink(f)


@pytest.mark.parametrize("chosen", [2, -1, 99, True, "0", 0.5])
def test_plan_chosen_out_of_range_is_a_user_error(tmp_path, chosen):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**VALID_PLAN, "chosen": chosen}))
    with pytest.raises(USER_ERRORS, match=r"p\.json.*chosen is .* must index candidates \(0\.\.1\)"):
        load_plan(str(f))


def test_truncated_plan_names_line_and_column(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(VALID_PLAN)[:50])
    with pytest.raises(USER_ERRORS, match=r"p\.json.*not valid JSON \(line 1 column \d+"):
        load_plan(str(f))


# -- strict JSON -------------------------------------------------------------------------------------------
@SETTINGS
@given(values)
def test_finite_json_is_strict_json_and_lists_what_it_nulled(doc):
    safe, bad = finite_json(doc)
    text = json.dumps(safe, allow_nan=False)  # raises if any NaN/Infinity survived
    assert json.loads(text) == safe

    def count(x):
        if isinstance(x, float):
            return 0 if math.isfinite(x) else 1
        items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        return sum(count(v) for v in items)

    assert len(bad) == count(doc)


def test_finite_json_names_each_path_and_reads_numpy():
    import numpy as np

    safe, bad = finite_json(
        {
            "steps": [{"loss": 1.5}, {"loss": float("nan")}],
            "r": np.float32("inf"),
            "n": np.int64(3),
            "a": np.array([1.0, np.nan]),
        }
    )
    assert safe == {"steps": [{"loss": 1.5}, {"loss": None}], "r": None, "n": 3, "a": [1.0, None]}
    assert bad == ["steps[1].loss", "r", "a[1]"]


# -- the CLI's list of user errors is complete ---------------------------------------------------------------
def _error_classes():
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
                yield mod, node.name


def test_every_project_error_type_is_printed_as_one_line():
    """A new `XError` class that the CLI does not list would escape as a traceback."""
    found = list(_error_classes())
    assert len(found) >= 10
    for mod, name in found:
        cls = getattr(importlib.import_module(mod), name)
        assert issubclass(cls, USER_ERRORS), f"{mod}.{name} is not in codesign.cli.user_error_types()"

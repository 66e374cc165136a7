"""Checkpointer: roundtrip, keep-last-N, resharded restore, compatibility errors, crash safety, and the
fault drill: non-finite saves refused, corrupt steps (flipped bytes, truncated data, broken metadata)
detected on restore and skipped for the newest good one."""

import glob
import inspect
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from codesign.train.checkpoint import (
    INTEGRITY_KEY,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointError,
    NonFiniteState,
)
from codesign.train.integrity import inspect_state
from tests.conftest import REPO, cpu_child_env, require_devices

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _mesh(shape, names):
    require_devices(8)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _state(mesh, scale=1.0):
    fsdp = NamedSharding(mesh, P("fsdp"))
    rep = NamedSharding(mesh, P())
    key = jax.random.key(0)
    return {
        "params": {
            "w": jax.device_put(jax.random.normal(key, (64, 32), jnp.float32) * scale, fsdp),
            "emb": jax.device_put(jax.random.normal(key, (16, 8), jnp.bfloat16), fsdp),
        },
        "opt": [
            jax.device_put(jnp.arange(24, dtype=jnp.int32).reshape(8, 3), fsdp),
            jax.device_put(jnp.float32(scale), rep),
        ],
    }


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _same_shardings(state):
    return jax.tree.map(lambda x: x.sharding, state)


def _assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()  # bit-exact, NaNs and -0.0 included


def test_roundtrip_bit_exact(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _state(mesh)
    extra = {"data": {"step": 4, "seed": 0}, "plan": {"mesh": [8]}, "model_fingerprint": "m1"}
    with Checkpointer(tmp_path / "ck", save_every=2, keep=3) as ck:
        assert ck.save(3, state, extra) is False  # not a multiple of save_every
        assert ck.save(4, state, extra) is True
        ck.wait()
        assert ck.latest_step() == 4
        got = ck.restore(None, _abstract(state, _same_shardings(state)), model_fingerprint="m1")
    assert got.step == 4 and got.extra == extra
    _assert_bit_equal(got.state, state)
    assert jax.tree.map(lambda x: x.sharding, got.state) == _same_shardings(state)
    # A fresh opener (another process after a restart) sees the same step and metadata.
    again = Checkpointer(tmp_path / "ck", read_only=True)
    assert again.latest_step() == 4 and again.read_extra() == extra
    again.close()


def test_restored_extra_hides_the_integrity_record(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, _state(mesh), {"model_fingerprint": "m"})
        ck.wait()
        saved = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
        assert set(saved[INTEGRITY_KEY]["leaves"]) == {"params/w", "params/emb", "opt/0", "opt/1"}
        assert ck.read_extra(1) == {"model_fingerprint": "m"}
        with pytest.raises(ValueError, match="reserved key"):
            ck.save(2, _state(mesh), {INTEGRITY_KEY: 1})


def test_keep_last_n(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    with Checkpointer(tmp_path, save_every=1, keep=2) as ck:
        for step in range(1, 6):
            ck.save(step, _state(mesh, scale=step), {"model_fingerprint": "m"})
        ck.wait()
        assert ck.all_steps() == [4, 5]
        got = ck.restore(4, _abstract(_state(mesh), _same_shardings(_state(mesh))))
    _assert_bit_equal(got.state, _state(mesh, scale=4))
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_resharded_restore(tmp_path):
    src_mesh = _mesh((8,), ("fsdp",))
    state = _state(src_mesh)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ck:
        ck.save(1, state, {"model_fingerprint": "m"})
    dst = _mesh((2, 4), ("data", "tensor"))
    shardings = {
        "params": {
            "w": NamedSharding(dst, P("tensor", "data")),
            "emb": NamedSharding(dst, P(None, "tensor")),
        },
        "opt": [NamedSharding(dst, P("data")), NamedSharding(dst, P())],
    }
    with Checkpointer(tmp_path) as ck:
        got = ck.restore(1, _abstract(state, shardings), model_fingerprint="m")
    _assert_bit_equal(got.state, state)
    assert jax.tree.map(lambda x: x.sharding, got.state) == shardings
    w = got.state["params"]["w"]
    assert {s.data.shape for s in w.addressable_shards} == {(16, 16)}  # really laid out the new way


def test_fingerprint_and_leaf_mismatch_errors(tmp_path):
    mesh = _mesh((8,), ("fsdp",))
    state = _state(mesh)
    abstract = _abstract(state, _same_shardings(state))
    with Checkpointer(tmp_path, save_every=1, keep=5) as ck:
        ck.save(1, state, {"model_fingerprint": "llama-a"})
        ck.save(2, state, {"model_fingerprint": "llama-a"})
    before = sorted(os.listdir(tmp_path))

    with Checkpointer(tmp_path, keep=1) as ck:
        with pytest.raises(CheckpointError, match="'llama-a'.*'llama-b'.*different --checkpoint-dir"):
            ck.restore(None, abstract, model_fingerprint="llama-b")
        # Saving another model's state here would let keep=1 delete the old run: refused instead.
        with pytest.raises(CheckpointError, match="different --checkpoint-dir"):
            ck.save(3, state, {"model_fingerprint": "llama-b"})

        wrong = dict(
            abstract,
            params=dict(
                abstract["params"],
                w=jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
            ),
        )
        with pytest.raises(
            CheckpointError,
            match=r"'params/w' expected shape \(64, 16\) dtype float32, "
            r"found shape \(64, 32\) dtype float32",
        ):
            ck.restore(2, wrong)
        wrong = dict(
            abstract,
            opt=[
                abstract["opt"][0],
                jax.ShapeDtypeStruct((), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
            ],
        )
        with pytest.raises(CheckpointError, match=r"'opt/1' expected shape \(\) dtype bfloat16, found"):
            ck.restore(2, wrong)
        with pytest.raises(CheckpointError, match="different state structure"):
            ck.restore(2, {"params": abstract["params"]})
        with pytest.raises(FileNotFoundError, match=r"available steps: \[1, 2\]"):
            ck.restore(7, abstract)
    assert sorted(os.listdir(tmp_path)) == before  # nothing deleted or added


def big_state(step):
    """Leaf i at step k is normal(key(i)) + k: 4 x 64 MiB of float32 over 8 devices. Random values,
    because constant arrays compress to a few hundred bytes and a save would finish in no time."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P("fsdp"))
    make = jax.jit(
        lambda i: jax.random.normal(jax.random.key(i), (4096, 4096)) + step,
        out_shardings=sh,
        static_argnums=0,
    )
    return {f"w{i}": make(i) for i in range(4)}


# The writer subprocess runs the same big_state, so the test can recompute what each step holds.
_LEAVES = "import jax\nfrom jax.sharding import AxisType, NamedSharding, PartitionSpec as P\n" + (
    textwrap.dedent(inspect.getsource(big_state))
)

_WRITER = _LEAVES + textwrap.dedent("""
    import sys
    from codesign.train.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], save_every=1, keep=10)
    for step in range(1, 100):
        ck.save(step, big_state(step), {"model_fingerprint": "big"})
        ck.wait()
        print(f"SAVED {step}", flush=True)
""")


def _tmp_dirs(d):
    return [n for n in os.listdir(d) if TMP_SUFFIX in n]


def _bytes_under(path):
    total = 0
    for root, _, files in os.walk(path):  # the tree may be renamed away under us: tolerate that
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _in_flight_with_data(d, min_bytes):
    return any(_bytes_under(os.path.join(d, n)) >= min_bytes for n in _tmp_dirs(d))


def test_sigkill_mid_save_leaves_last_complete_step(tmp_path):
    require_devices(8)
    env = cpu_child_env(8)
    for attempt in range(3):  # the kill must land while a step is unfinalized; retry a missed window
        d = tmp_path / f"run{attempt}"
        d.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(d)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watchdog = threading.Timer(60, proc.kill)  # bounds the blocking readline below
        watchdog.start()
        try:
            assert proc.stdout.readline().strip() == "SAVED 1", proc.stderr.read()
            deadline = time.monotonic() + 20
            # Kill once a step's arrays are partly on disk (16 MiB of its 256), not finalized yet.
            while (
                not _in_flight_with_data(d, 16 << 20) and time.monotonic() < deadline and proc.poll() is None
            ):
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        partial = _tmp_dirs(d)
        if partial:
            break
    else:
        pytest.fail("never caught a save in flight in 3 attempts")

    complete = sorted(int(n) for n in os.listdir(d) if n.isdigit())
    partial_step = int(partial[0].split(".")[0])
    assert complete and partial_step == complete[-1] + 1

    reader = Checkpointer(d, read_only=True)  # ignores the leftover, and leaves it alone
    assert reader.latest_step() == complete[-1]
    assert _tmp_dirs(d) == partial
    reader.close()

    with Checkpointer(d, save_every=1, keep=10) as writer:  # a writer cleans up the leftover
        expected = big_state(complete[-1])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), expected
        )
        got = writer.restore(None, abstract, model_fingerprint="big")
        assert got.step == complete[-1]
        _assert_bit_equal(got.state, expected)
        assert _tmp_dirs(d) == []
        writer.save(partial_step, got.state, {"model_fingerprint": "big"})  # the lost step can be redone
    with Checkpointer(d, read_only=True) as reader:
        assert reader.latest_step() == partial_step


# -- the fault drill ------------------------------------------------------------------------------------
def _drill_state(mesh, step):
    """Random values (incompressible, so data files are not inlined in OCDBT's b-tree), distinct per step."""
    sh = NamedSharding(mesh, P("fsdp"))
    return {
        "w": jax.device_put(jax.random.normal(jax.random.key(step), (512, 256), jnp.float32), sh),
        "b": jax.device_put(jax.random.normal(jax.random.key(100 + step), (64,), jnp.bfloat16), sh),
        "count": jax.device_put(jnp.int32(step), NamedSharding(mesh, P())),
    }


def _drill_dir(tmp_path, steps=(1, 2, 3)):
    mesh = _mesh((8,), ("fsdp",))
    d = tmp_path / "ck"
    with Checkpointer(d, save_every=1, keep=10) as ck:
        for step in steps:
            ck.save(step, _drill_state(mesh, step), {"model_fingerprint": "m", "data": {"next_step": step}})
    return d, mesh


def _largest_data_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return pathlib.Path(max(files, key=os.path.getsize))


def _flip_bytes(step_dir):
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])  # 64 bytes, as in the drill
    path.write_bytes(bytes(data))


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _break_json(rel):
    def corrupt(step_dir):
        path = pathlib.Path(step_dir, rel)
        text = path.read_text()
        path.write_text(text[: len(text) // 2])  # cut mid-document: no longer valid JSON

    return corrupt


def _edit_metadata(step_dir):
    """Valid JSON, wrong content: the data loader position changed behind the checkpoint's back."""
    path = pathlib.Path(step_dir, "meta", "metadata")
    doc = json.loads(path.read_text())
    doc["data"]["next_step"] += 1
    path.write_text(json.dumps(doc))


FAULTS = {
    "flipped-bytes": (_flip_bytes, "does not match the digest saved with it"),
    "truncated-data": (_truncate, "array data unreadable"),
    "broken-meta-json": (_break_json("meta/metadata"), "metadata unreadable"),
    "broken-array-metadata": (_break_json("state/_METADATA"), "array metadata unreadable"),
    "edited-meta": (_edit_metadata, "metadata does not match the checksum"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_corrupt_latest_step_falls_back_to_newest_good(tmp_path, fault):
    d, mesh = _drill_dir(tmp_path)
    corrupt, reason = FAULTS[fault]
    corrupt(str(d / "3"))
    abstract = _abstract(_drill_state(mesh, 0), _same_shardings(_drill_state(mesh, 0)))
    with Checkpointer(d, read_only=True) as ck:
        got = ck.restore(None, abstract, model_fingerprint="m")
        assert got.step == 2 and got.verified and got.extra["data"] == {"next_step": 2}
        assert [s for s, _ in got.skipped] == [3] and reason in got.skipped[0][1], got.skipped
        _assert_bit_equal(got.state, _drill_state(mesh, 2))
        with pytest.raises(
            CheckpointCorrupt, match=f"step 3: .*{reason}"
        ):  # asked for by number: no fallback
            ck.restore(3, abstract)
    assert sorted(os.listdir(d)) == ["1", "2", "3"]  # nothing deleted


def test_no_good_step_is_one_error(tmp_path):
    d, mesh = _drill_dir(tmp_path, steps=(1, 2))
    _flip_bytes(str(d / "2"))
    _truncate(str(d / "1"))
    abstract = _abstract(_drill_state(mesh, 0), _same_shardings(_drill_state(mesh, 0)))
    with (
        Checkpointer(d, read_only=True) as ck,
        pytest.raises(
            CheckpointCorrupt,
            match="no readable checkpoint in .*step 2: .*digest.*step 1: .*array data unreadable",
        ) as e,
    ):
        ck.restore(None, abstract)
    assert [s for s, _ in e.value.skipped] == [2, 1] and "\n" not in str(e.value)


def test_set_aside_keeps_the_bytes_and_frees_the_step(tmp_path):
    d, mesh = _drill_dir(tmp_path)
    _flip_bytes(str(d / "3"))
    before = sorted(os.listdir(d / "3"))
    with Checkpointer(d, save_every=1, keep=2) as ck:
        moved = ck.set_aside(3)
        assert moved == str(d / "3.unreadable") and sorted(os.listdir(moved)) == before
        assert ck.all_steps() == [1, 2]
        ck.save(3, _drill_state(mesh, 3), {"model_fingerprint": "m"})  # the step number is free again
        ck.save(4, _drill_state(mesh, 4), {"model_fingerprint": "m"})
        ck.wait()
        assert ck.all_steps() == [3, 4]  # keep=2 rotated 1 and 2 away, never the set-aside copy
    assert os.path.isdir(moved)


def test_non_finite_state_is_never_saved(tmp_path):
    d, mesh = _drill_dir(tmp_path, steps=(1,))
    before = sorted(os.listdir(d))
    good = _drill_state(mesh, 2)
    with Checkpointer(d, save_every=1, keep=1) as ck:
        nan_w = dict(good, w=good["w"].at[7, 3].set(jnp.nan))
        with pytest.raises(
            NonFiniteState,
            match=r"step 2: refusing .* NaN or Infinity in w; the checkpoints in .* "
            r"\(steps \[1\]\) are untouched",
        ):
            ck.save(2, nan_w, {"model_fingerprint": "m"})
        inf_b = dict(good, b=good["b"].at[0].set(jnp.inf))  # bf16 leaves are checked too
        with pytest.raises(NonFiniteState, match="in b;"):
            ck.save(2, inf_b, {"model_fingerprint": "m"})
        with pytest.raises(NonFiniteState, match=r"metadata holds a non-finite number \(loss\)"):
            ck.save(2, good, {"model_fingerprint": "m", "loss": float("nan")})
        ck.wait()
        assert ck.all_steps() == [1]  # keep=1 never rotated the good step away
    assert sorted(os.listdir(d)) == before


def test_digest_is_sharding_independent_and_position_sensitive():
    mesh = _mesh((8,), ("fsdp",))
    x = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    a = {"x": jax.device_put(x, NamedSharding(mesh, P("fsdp")))}
    other = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    b = {"x": jax.device_put(x, NamedSharding(other, P("tensor", "data")))}
    assert inspect_state(a) == inspect_state(b)
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same multiset of values, other positions
    one_bit = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32).at[5, 5].add(1), jnp.float32
    )
    for changed in (swapped, one_bit):
        assert inspect_state({"x": changed})[0] != inspect_state(a)[0]
    assert inspect_state({"x": x.at[1, 1].set(jnp.nan)})[1] == ["x"]


def test_checkpoint_without_integrity_record_restores_unverified(tmp_path):
    """A step written before digests existed still restores (finite-checked), flagged unverified."""
    d, mesh = _drill_dir(tmp_path, steps=(1,))
    path = d / "1" / "meta" / "metadata"
    doc = json.loads(path.read_text())
    del doc[INTEGRITY_KEY]
    path.write_text(json.dumps(doc))
    abstract = _abstract(_drill_state(mesh, 0), _same_shardings(_drill_state(mesh, 0)))
    with Checkpointer(d, read_only=True) as ck:
        got = ck.restore(None, abstract)
    assert got.step == 1 and got.verified is False and got.skipped == ()
    _assert_bit_equal(got.state, _drill_state(mesh, 1))

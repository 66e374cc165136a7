"""Checkpointer: roundtrip, keep-last-N, resharded restore, compatibility errors, crash safety."""

import inspect
import os
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

from codesign.train.checkpoint import Checkpointer, CheckpointError
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
        "opt": [jax.device_put(jnp.arange(24, dtype=jnp.int32).reshape(8, 3), fsdp),
                jax.device_put(jnp.float32(scale), rep)],
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
        "params": {"w": NamedSharding(dst, P("tensor", "data")), "emb": NamedSharding(dst, P(None, "tensor"))},
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

        wrong = dict(abstract, params=dict(abstract["params"], w=jax.ShapeDtypeStruct(
            (64, 16), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))))
        with pytest.raises(CheckpointError, match=r"'params/w' expected shape \(64, 16\) dtype float32, "
                                                  r"found shape \(64, 32\) dtype float32"):
            ck.restore(2, wrong)
        wrong = dict(abstract, opt=[abstract["opt"][0], jax.ShapeDtypeStruct(
            (), jnp.bfloat16, sharding=NamedSharding(mesh, P()))])
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
    make = jax.jit(lambda i: jax.random.normal(jax.random.key(i), (4096, 4096)) + step, out_shardings=sh,
                   static_argnums=0)
    return {f"w{i}": make(i) for i in range(4)}


# The writer subprocess runs the same big_state, so the test can recompute what each step holds.
_LEAVES = "import jax\nfrom jax.sharding import AxisType, NamedSharding, PartitionSpec as P\n" + (
    textwrap.dedent(inspect.getsource(big_state)))

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
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(60, proc.kill)  # bounds the blocking readline below
        watchdog.start()
        try:
            assert proc.stdout.readline().strip() == "SAVED 1", proc.stderr.read()
            deadline = time.monotonic() + 20
            # Kill once a step's arrays are partly on disk (16 MiB of its 256), not finalized yet.
            while (not _in_flight_with_data(d, 16 << 20) and time.monotonic() < deadline
                   and proc.poll() is None):
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
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), expected)
        got = writer.restore(None, abstract, model_fingerprint="big")
        assert got.step == complete[-1]
        _assert_bit_equal(got.state, expected)
        assert _tmp_dirs(d) == []
        writer.save(partial_step, got.state, {"model_fingerprint": "big"})  # the lost step can be redone
    with Checkpointer(d, read_only=True) as reader:
        assert reader.latest_step() == partial_step

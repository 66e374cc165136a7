"""Token sources: determinism, resume, process sharding, file errors, global arrays."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from codesign.train.data import SyntheticSource, TokenFileSource
from tests.conftest import require_devices


def _token_file(tmp_path, n=10_000, dtype="uint16", vocab=1000, name="tokens.bin"):
    path = tmp_path / name
    np.random.default_rng(0).integers(0, vocab, n).astype(dtype).tofile(path)
    return path


def _sources(tmp_path, seed=0, **kw):
    path = _token_file(tmp_path)
    return [
        SyntheticSource(97, 16, 8, seed, **kw),
        TokenFileSource(path, 16, 8, seed, vocab_size=1000, **kw),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["synthetic", "token_file"])
def test_determinism(tmp_path, which):
    a, b = _sources(tmp_path)[which], _sources(tmp_path)[which]
    other = _sources(tmp_path, seed=1)[which]
    for step in (0, 1, 7, 123):
        x = a.batch(step)
        assert x.dtype == np.int32 and x.shape == (8, 17)
        np.testing.assert_array_equal(x, b.batch(step))
        assert not np.array_equal(x, other.batch(step))
    assert not np.array_equal(a.batch(0), a.batch(1))


@pytest.mark.parametrize("which", [0, 1], ids=["synthetic", "token_file"])
def test_resume_from_state(tmp_path, which):
    run = _sources(tmp_path)[which]
    for _ in range(5):
        run.next_batch()
    state = json.loads(json.dumps(run.state()))  # must survive the JSON checkpoint item
    assert state["step"] == 5 and state["seed"] == 0 and "epoch" in state
    expected = [run.next_batch() for _ in range(6)]
    resumed = _sources(tmp_path)[which]
    resumed.restore(state)
    for want in expected:
        np.testing.assert_array_equal(resumed.next_batch(), want)
    with pytest.raises(ValueError, match="seed: saved 0 vs now 3"):
        _sources(tmp_path, seed=3)[which].restore(state)


@pytest.mark.parametrize("which", [0, 1], ids=["synthetic", "token_file"])
def test_two_processes_concatenate_to_global_batch(tmp_path, which):
    whole = _sources(tmp_path)[which]
    halves = [_sources(tmp_path, process_index=i, process_count=2)[which] for i in range(2)]
    for step in (0, 3, 50):
        parts = [h.batch(step) for h in halves]
        assert all(p.shape == (4, 17) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole.batch(step))
    with pytest.raises(ValueError, match="global_batch=8 is not divisible by process_count=3"):
        SyntheticSource(97, 16, 8, 0, process_index=0, process_count=3)


def test_synthetic_is_learnable_progression():
    src = SyntheticSource(vocab_size=101, seq_len=64, global_batch=32, seed=0, noise=0.1)
    x = src.batch(0).astype(np.int64)
    assert x.min() >= 0 and x.max() < 101
    diffs = (x[:, 1:] - x[:, :-1]) % 101
    # Each row's modal step is its stride in 1..4, and most transitions follow it.
    modal = np.array([np.bincount(d, minlength=101).argmax() for d in diffs])
    assert set(modal) <= {1, 2, 3, 4}
    assert (diffs == modal[:, None]).mean() > 0.7
    clean = SyntheticSource(101, 64, 32, 0, noise=0.0).batch(0).astype(np.int64)
    d = (clean[:, 1:] - clean[:, :-1]) % 101
    assert (d == d[:, :1]).all()


def test_token_file_epochs_cover_every_window(tmp_path):
    # 100 windows of 10 tokens, each window's tokens all equal its index: read back which were drawn.
    path = tmp_path / "w.bin"
    np.repeat(np.arange(100, dtype=np.uint16), 10).tofile(path)
    src = TokenFileSource(path, seq_len=9, global_batch=8, seed=5)
    drawn = np.concatenate([src.batch(s)[:, 0] for s in range(25)])  # 200 samples = 2 epochs
    assert sorted(drawn[:100]) == list(range(100)) and sorted(drawn[100:]) == list(range(100))
    assert not np.array_equal(drawn[:100], drawn[100:])  # a new order each epoch
    assert all((src.batch(s) == src.batch(s)[:, :1]).all() for s in range(3))  # whole windows
    assert src.state()["epoch"] == 0
    src.batch(12)  # samples 104..111 lie in epoch 1
    assert src.state()["epoch"] == 1


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_dtypes(tmp_path, dtype):
    big = 70_000 if dtype == "uint32" else 60_000  # uint32 ids past the uint16 range
    tokens = np.arange(0, 2_000, dtype=np.int64) * 37 % big
    path = tmp_path / f"t.{dtype}"
    tokens.astype(dtype).tofile(path)
    src = TokenFileSource(path, seq_len=19, global_batch=4, seed=0, dtype=dtype, vocab_size=big)
    rows = src.batch(0)
    assert rows.dtype == np.int32
    for row in rows:  # every row is a contiguous, window-aligned slice of the file
        start = np.flatnonzero(tokens == row[0])
        assert any(s % 20 == 0 and np.array_equal(tokens[s : s + 20], row) for s in start)


def test_token_file_errors(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError) as e:
        TokenFileSource(missing, 16, 8, 0)
    assert str(missing) in str(e.value) and "np.array(tokens, dtype=np.uint16).tofile(" in str(e.value)

    short = tmp_path / "short.bin"
    np.arange(10, dtype=np.uint16).tofile(short)
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenFileSource(short, 16, 8, 0)

    path = _token_file(tmp_path, vocab=1000)
    src = TokenFileSource(path, 16, 8, 0, vocab_size=500)  # the file has ids up to 999
    with pytest.raises(ValueError, match=r"token id \d+ .*outside vocab_size=500"):
        src.batch(0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TokenFileSource(path, 16, 8, 0, dtype="int8")


def test_global_batch_array_on_8_devices(tmp_path):
    require_devices(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for src in _sources(tmp_path):
        for sharding in (NamedSharding(mesh, P("data")), P("data")):
            arr = src.global_batch_array(3, mesh, sharding)
            assert arr.shape == (8, 17) and arr.dtype == np.int32
            assert arr.sharding == NamedSharding(mesh, P("data"))
            assert len(arr.addressable_shards) == 8
            assert all(s.data.shape == (1, 17) for s in arr.addressable_shards)
            np.testing.assert_array_equal(np.asarray(arr), src.batch(3))


def test_global_batch_array_rejects_wrong_process_count():
    require_devices(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    src = SyntheticSource(97, 16, 8, 0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_count=2 but JAX runs 1"):
        src.global_batch_array(0, mesh, P("data"))

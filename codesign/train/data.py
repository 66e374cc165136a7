"""Token sources for the trainer: deterministic, resumable and process-sharded.

Every source returns int32 token ids of shape [rows, seq_len + 1]; the model uses `inputs = b[:, :-1]`,
`targets = b[:, 1:]`. A batch is a pure function of (seed, step), so a run resumed at step k sees exactly
the batches an uninterrupted run would have seen; `state()` / `restore()` only carry the next step (plus
the settings that make the position meaningful) so the loader position can be checkpointed as JSON.

Each process materializes only its own rows of the global batch,
`[process_index * per_proc, (process_index + 1) * per_proc)`, and `global_batch_array` stitches the
per-process rows into one global `jax.Array` sharded over the data-parallel mesh axes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class _Source:
    """Shared plumbing: process slicing, loader position, JSON state, global array assembly."""

    kind = "source"

    def __init__(self, seq_len: int, global_batch: int, seed: int, process_index: int, process_count: int):
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len and global_batch must be >= 1, got {seq_len} and {global_batch}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if global_batch % process_count:
            raise ValueError(
                f"global_batch={global_batch} is not divisible by process_count={process_count}: every "
                f"process must load the same number of rows; pick a global batch that is a multiple of "
                f"{process_count}"
            )
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.per_process = self.global_batch // self.process_count
        self.row_start = self.process_index * self.per_process
        self.next_step = 0  # loader position: the step whose batch is read next

    @property
    def local_shape(self) -> tuple[int, int]:
        return (self.per_process, self.seq_len + 1)

    @property
    def global_shape(self) -> tuple[int, int]:
        return (self.global_batch, self.seq_len + 1)

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of the global batch for `step` (int32 [per_process, seq_len + 1])."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = self._rows(int(step))
        self.next_step = int(step) + 1
        return rows

    def next_batch(self) -> np.ndarray:
        """The batch at the loader position (advances it)."""
        return self.batch(self.next_step)

    def _rows(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Settings a saved position only makes sense under; `restore` insists they match."""
        return {
            "source": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def state(self) -> dict[str, Any]:
        return {**self._identity(), "step": self.next_step}

    def restore(self, state: dict[str, Any]) -> None:
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in diff.items())
            raise ValueError(
                f"cannot resume the data loader: the saved position was taken with different settings "
                f"({details}); the same step would read different data. Resume with the saved settings "
                f"or start a fresh run."
            )
        self.next_step = int(state["step"])

    def global_batch_array(
        self, step: int, mesh: Mesh | None, sharding: NamedSharding | PartitionSpec
    ) -> jax.Array:
        """The global batch for `step` as one jax.Array, built from this process's rows only.

        `sharding` shards the batch dim over the data-parallel mesh axes (a PartitionSpec is bound to
        `mesh`). The rows this process's devices hold must be exactly the rows it loads.
        """
        if isinstance(sharding, PartitionSpec):
            if mesh is None:
                raise ValueError("a PartitionSpec sharding needs a mesh")
            sharding = NamedSharding(mesh, sharding)
        if self.process_count != jax.process_count():
            raise ValueError(
                f"this source was built for process_count={self.process_count} but JAX runs "
                f"{jax.process_count()} processes; pass process_index=jax.process_index(), "
                f"process_count=jax.process_count()"
            )
        gshape = self.global_shape
        starts, stops = [], []
        for idx in sharding.addressable_devices_indices_map(gshape).values():
            rows = idx[0].indices(gshape[0])
            starts.append(rows[0])
            stops.append(rows[1])
        want = (self.row_start, self.row_start + self.per_process)
        if (min(starts), max(stops)) != want:
            raise ValueError(
                f"sharding {sharding.spec} puts global rows [{min(starts)}, {max(stops)}) on process "
                f"{self.process_index}'s devices, but it loads rows [{want[0]}, {want[1]}); shard the batch "
                f"dim over the data-parallel axes that span processes, in process order"
            )
        return jax.make_array_from_process_local_data(sharding, self.batch(step), gshape)


class SyntheticSource(_Source):
    """Learnable synthetic tokens: noisy arithmetic progressions modulo the vocabulary.

    Row r of a batch draws a start token a ~ U[0, vocab) and a stride d ~ U{1..4}; its clean tokens are
    `(a + d * t) % vocab`. Then each token is independently replaced by a uniform random id with
    probability `noise` (default 0.1). A bigram model can learn "next = current + small stride"
    (loss falls from ln(vocab) towards about ln(4)); a model that attends to two earlier tokens can infer
    d and do better, down to the noise floor. So a tiny model's loss visibly drops within ~30 steps.
    Batches are generated for the whole global batch from `default_rng([seed, step])`, then sliced.
    """

    kind = "synthetic"

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        global_batch: int,
        seed: int,
        *,
        noise: float = 0.1,
        process_index: int = 0,
        process_count: int = 1,
    ):
        super().__init__(seq_len, global_batch, seed, process_index, process_count)
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.vocab_size, self.noise = int(vocab_size), float(noise)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "vocab_size": self.vocab_size, "noise": self.noise}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "epoch": 0}  # an endless stream has no epochs

    def _rows(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        b, n, v = self.global_batch, self.seq_len + 1, self.vocab_size
        start = rng.integers(0, v, size=(b, 1), dtype=np.int64)
        stride = rng.integers(1, 5, size=(b, 1), dtype=np.int64)
        tokens = (start + stride * np.arange(n, dtype=np.int64)) % v
        noisy = rng.random((b, n)) < self.noise
        tokens = np.where(noisy, rng.integers(0, v, size=(b, n), dtype=np.int64), tokens)
        return tokens[self.row_start : self.row_start + self.per_process].astype(np.int32)


class TokenFileSource(_Source):
    """Windows of a memory-mapped flat file of token ids (raw uint16 or uint32, no header).

    The file is cut into non-overlapping windows of seq_len + 1 tokens (a trailing partial window is
    unused). Global sample i = step * global_batch + row lies in epoch i // n_windows at position
    i % n_windows of that epoch's permutation (`default_rng([seed, epoch])`), so every window is seen
    once per epoch, each epoch in a new order, and a batch may straddle an epoch boundary.
    """

    kind = "token_file"

    def __init__(
        self,
        path: str | os.PathLike,
        seq_len: int,
        global_batch: int,
        seed: int,
        dtype: str = "uint16",
        process_index: int = 0,
        process_count: int = 1,
        *,
        vocab_size: int | None = None,
    ):
        super().__init__(seq_len, global_batch, seed, process_index, process_count)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.path, self.dtype, self.vocab_size = os.fspath(path), dtype, vocab_size
        np_dtype = np.dtype(_DTYPES[dtype])
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"token file {self.path!r} does not exist. It must be a flat array of {dtype} token ids "
                f"with no header; create one with "
                f"`np.array(tokens, dtype=np.{dtype}).tofile({self.path!r})`"
            )
        size = os.path.getsize(self.path)
        if size % np_dtype.itemsize:
            raise ValueError(
                f"token file {self.path!r} has {size} bytes, not a multiple of {np_dtype.itemsize} "
                f"({dtype}); is the dtype right?"
            )
        self.n_tokens = size // np_dtype.itemsize
        self.n_windows = self.n_tokens // (self.seq_len + 1)
        if self.n_windows == 0:
            raise ValueError(
                f"token file {self.path!r} holds {self.n_tokens} tokens, fewer than one window of "
                f"seq_len + 1 = {self.seq_len + 1}; use a longer file or a shorter seq_len"
            )
        self._tokens = np.memmap(self.path, dtype=np_dtype, mode="r", shape=(self.n_tokens,))
        self._perms: dict[int, np.ndarray] = {}

    def _identity(self) -> dict[str, Any]:
        # n_windows pins the file length: a different file would silently reorder the data.
        return {**super()._identity(), "dtype": self.dtype, "n_windows": self.n_windows}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "epoch": self.next_step * self.global_batch // self.n_windows}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep memory bounded
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def _rows(self, step: int) -> np.ndarray:
        window = self.seq_len + 1
        first = step * self.global_batch + self.row_start
        raw = np.empty(self.local_shape, dtype=self._tokens.dtype)
        for r, i in enumerate(range(first, first + self.per_process)):
            start = int(self._perm(i // self.n_windows)[i % self.n_windows]) * window
            raw[r] = self._tokens[start : start + window]  # copies only this window from the mapping
        # Check the raw ids before the int32 cast: uint32 ids past 2**31 would wrap silently.
        limit = self.vocab_size if self.vocab_size is not None else 2**31
        top = int(raw.max())
        if top >= limit:
            what = f"vocab_size={self.vocab_size}" if self.vocab_size is not None else "the int32 range"
            raise ValueError(
                f"token file {self.path!r} holds token id {top} (read at step {step}), outside {what}; "
                f"the file was tokenized with a different vocabulary or is read with the wrong dtype"
            )
        return raw.astype(np.int32)


# -- what the trainer and validate read: one global batch array per step ------------------------------
def make_source_factory(
    data: str, vocab_size: int, seq_len: int, global_batch: int, seed: int, data_dtype: str = "uint16"
) -> Callable[[int, int], _Source]:
    """(process_index, process_count) -> source. Builds one eagerly so a bad path fails now."""
    if data == "synthetic":

        def factory(pi: int, pc: int) -> _Source:
            return SyntheticSource(
                vocab_size, seq_len, global_batch, seed, process_index=pi, process_count=pc
            )
    else:

        def factory(pi: int, pc: int) -> _Source:
            return TokenFileSource(
                data,
                seq_len,
                global_batch,
                seed,
                dtype=data_dtype,
                process_index=pi,
                process_count=pc,
                vocab_size=vocab_size,
            )

    factory(0, 1)
    return factory


class BatchMaker:
    """Global batch arrays for a step. Each process loads only the rows its devices hold: its own
    1/P of the batch when the batch is split evenly over processes in order (data parallel across
    hosts); otherwise the row range its devices need (e.g. all rows when the batch is replicated)."""

    def __init__(
        self, factory: Callable[[int, int], _Source], global_batch: int, seq_len: int, sharding: NamedSharding
    ):
        self.sharding = sharding
        b, n = global_batch, seq_len + 1
        self.gshape = (b, n)
        pi, pc = jax.process_index(), jax.process_count()
        ranges = sorted(
            {idx[0].indices(b)[:2] for idx in sharding.addressable_devices_indices_map(self.gshape).values()}
        )
        self.rows = (ranges[0][0], max(r[1] for r in ranges))
        even = b % pc == 0 and self.rows == (pi * (b // pc), (pi + 1) * (b // pc))
        self.split = pc == 1 or even
        self.source = factory(pi, pc) if self.split else factory(0, 1)

    def __call__(self, step: int) -> jax.Array:
        if self.split:
            return self.source.global_batch_array(step, None, self.sharding)
        lo, hi = self.rows
        rows = self.source.batch(step)[lo:hi]
        return jax.make_array_from_process_local_data(self.sharding, rows, self.gshape)

    def state_at(self, next_step: int) -> dict[str, Any]:
        """The loader state as it is when `next_step` is the next batch to read."""
        saved = self.source.next_step
        self.source.next_step = int(next_step)
        try:
            return self.source.state()
        finally:
            self.source.next_step = saved

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved loader state; ValueError when it belongs to other data or settings."""
        self.source.restore(state)

"""Checkpointing of any pytree of jax.Arrays, on Orbax's CheckpointManager, that cannot poison itself.

Each step directory holds two items: `state` (the array pytree, `StandardSave`, OCDBT/Tensorstore) and
`meta` (JSON: data-loader state, plan spec, model fingerprint, ..., plus an integrity record). Saves are
asynchronous: `save` returns once the arrays are copied off the devices and the write continues in a
background thread.

Crash safety comes from Orbax: a step is written to `<step>.orbax-checkpoint-tmp-<ts>/` and renamed to
`<step>/` only once complete, and step listing ignores the temporary directories. So a process killed
mid-save leaves the previous complete step as the latest; a writer (not `read_only`) removes such
leftovers when it opens the directory.

Integrity. Orbax 0.12 has no integrity option for array data: OCDBT checks a CRC only on its b-tree
nodes, so flipped bytes in a data file restore silently as wrong numbers. So `save` writes a digest of
every array (two position-keyed 32-bit hash sums, computed on the devices, independent of the sharding)
and a SHA-256 of the metadata into the `meta` item, and `restore` recomputes and compares them.
`save` refuses a state with a non-finite float anywhere (`NonFiniteState`) and metadata holding NaN or
Infinity, so every step on disk is one worth resuming from.

Restore takes an abstract pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`; Orbax reads each
array straight into the requested sharding, so the mesh and PartitionSpecs may differ from the ones
saved. Before reading any array we check the model fingerprint and every leaf's shape and dtype, and
raise `CheckpointError` on a mismatch. A latest step that cannot be read back as saved (unreadable
metadata or data, digest mismatch, non-finite values) is skipped for the newest good one, and the
skipped steps are reported in `Restored.skipped`. Nothing is ever deleted or overwritten on an error;
`set_aside` renames an unreadable step out of the way so that its step number can be saved again.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from codesign import _compat
from codesign.train.integrity import DIGEST_ALGORITHM, extra_sha256, inspect_state, leaves_by_path

FINGERPRINT_KEY = "model_fingerprint"
INTEGRITY_KEY = "_integrity"  # reserved key of the saved metadata; `read_extra` strips it
SET_ASIDE_SUFFIX = ".unreadable"


class CheckpointError(ValueError):
    """A checkpoint exists but does not fit this run (model fingerprint, leaf shapes or dtypes), or
    cannot be written as asked."""


class CheckpointCorrupt(CheckpointError):
    """A step on disk cannot be read back as it was saved (unreadable files or a digest mismatch)."""

    def __init__(self, message: str, skipped: tuple[tuple[int, str], ...] = ()):
        super().__init__(message)
        self.skipped = skipped


class NonFiniteState(CheckpointError):
    """A save was refused because the state (or the metadata) holds NaN or Infinity."""

    def __init__(self, message: str, paths: list[str]):
        super().__init__(message)
        self.paths = paths  # the offending leaves (or metadata keys)


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any  # pytree of jax.Arrays with the requested shardings
    extra: dict[str, Any]  # the JSON metadata saved with the step
    skipped: tuple[tuple[int, str], ...] = ()  # newer steps that were unreadable: (step, why)
    verified: bool = True  # False: saved before digests were written (checked for finiteness only)


_READ_ECHOES = ("Encountered error while reading array", "Event loop is closed")


def _is_read_echo(e: BaseException | None) -> bool:
    return e is not None and any(m in str(e) for m in _READ_ECHOES)


class _EchoLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_read_echo(record.exc_info[1] if record.exc_info else None)


_ECHO_LOG_FILTER = _EchoLogFilter()
_echoes_dropped = 0


def _echo_dropping_hook(previous):
    def hook(unraisable):
        global _echoes_dropped
        if _is_read_echo(unraisable.exc_value):
            _echoes_dropped += 1
        else:
            previous(unraisable)

    hook.drops_read_echoes = True
    return hook


def _collect_read_echoes(settle_s: float = 0.5, max_wait_s: float = 5.0) -> None:
    """Orbax reads every array concurrently and re-raises the first failure at once, closing its event
    loop; the other reads fail again later, as unraisable exceptions: their coroutines when garbage-
    collected ("Exception ignored in", "Task exception was never retrieved"), their TensorStore
    callbacks when they complete ("Event loop is closed"). Those are echoes of the error already
    reported: from the first failure on, this process drops them (only those two messages), and here
    we wait until they stop (none new for `settle_s`), so that no traceback follows the one-line report."""
    if not getattr(sys.unraisablehook, "drops_read_echoes", False):
        sys.unraisablehook = _echo_dropping_hook(sys.unraisablehook)
    logging.getLogger("asyncio").addFilter(_ECHO_LOG_FILTER)  # a no-op when already added
    start = last = time.monotonic()
    seen = -1
    while time.monotonic() - start < max_wait_s:
        gc.collect()
        if _echoes_dropped != seen:
            seen, last = _echoes_dropped, time.monotonic()
        elif time.monotonic() - last >= settle_s:
            break
        time.sleep(0.05)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = line.split(". See full TensorStore details")[0]  # the rest is a multi-line spec dump
    return line if len(line) <= limit else line[:limit] + "..."


def _names(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


class Checkpointer:
    """Async, keep-last-N checkpoints of a state pytree plus JSON metadata, verified on restore.

    `rows` ({leaf path: n}) names leaves whose first n rows are data and whose further rows are zero
    padding that the layout adds (a pipelined stack whose layers do not divide by the stages:
    `StateLayout.logical_rows`). Their digests cover the n rows, and a restore pads or truncates the
    padding to the rows the target layout stores, so such checkpoints move between layouts.

    `adapt`, given the saved leaves ({path: (shape, dtype)}), may return (the abstract state to read
    them as, a function from that state to the wanted one): a state saved in another form (with or
    without a master copy: `StateLayout.checkpoint_adapter`) is read and verified as saved, then
    converted."""

    def __init__(
        self,
        directory: str | os.PathLike,
        save_every: int = 1,
        keep: int = 3,
        async_save: bool = True,
        *,
        read_only: bool = False,
        rows: Mapping[str, int] | None = None,
        adapt: Callable[[dict], tuple[Any, Callable[[Any], Any]] | None] | None = None,
    ):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every, self.keep, self.read_only = int(save_every), int(keep), read_only
        self.rows = dict(rows or {})
        self.adapt = adapt
        options = ocp.CheckpointManagerOptions(
            # Only multiples of save_every (plus Orbax's preemption signal); not InitialSavePolicy,
            # which the default policy adds and which would save whatever step comes first.
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(self.save_every), ocm.PreemptionCheckpointingPolicy()]
            ),
            # Rotation deletes only after a newer step is finalized, and every saved step passed the
            # finiteness check, so the newest good step is never the one removed.
            preservation_policy=ocm.LatestN(self.keep),  # `max_to_keep` is deprecated in 0.12
            enable_async_checkpointing=async_save,
            # The writer owns the directory, so it may remove unfinalized leftovers of a crashed run;
            # a read-only opener must not: the leftover could be another process's in-flight save.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        # Handlers registered up front, so a fresh process can read metadata before any save of its own.
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        self._guarded = False  # fingerprint of the directory's existing run checked once, on first save

    # -- queries -------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest step; finalized ones only when read from a fresh process. In the writing process
        it includes a save still in flight (Orbax's view); `wait()` first to be sure it is on disk."""
        return self._mgr.latest_step()

    def read_extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (default: latest), without touching the arrays. Raises
        CheckpointCorrupt when it is unreadable or does not match the checksum saved with it."""
        extra, _ = self._read_meta(self._resolve(step))
        return extra

    def newest_readable_extra(self) -> tuple[int | None, dict[str, Any] | None]:
        """(step, metadata) of the newest step whose metadata reads back intact; (None, None) if none."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.read_extra(step)
            except CheckpointCorrupt:
                continue
        return None, None

    def _read_meta(self, step: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(metadata without the integrity record, the integrity record or None for older saves)."""
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - JSON, file and Orbax errors alike: the step is unreadable
            raise CheckpointCorrupt(f"step {step}: metadata unreadable ({_first_line(e)})") from None
        if not isinstance(meta, dict):
            raise CheckpointCorrupt(f"step {step}: metadata is not a JSON object")
        meta = dict(meta)
        record = meta.pop(INTEGRITY_KEY, None)
        if record is not None:
            if not isinstance(record, dict) or record.get("algorithm") != DIGEST_ALGORITHM:
                raise CheckpointCorrupt(
                    f"step {step}: integrity record unreadable or of an unknown algorithm"
                )
            try:
                ok = record.get("extra_sha256") == extra_sha256(meta)
            except ValueError:  # NaN in metadata that claims to be checked: it was altered
                ok = False
            if not ok:
                raise CheckpointCorrupt(f"step {step}: metadata does not match the checksum saved with it")
        return meta, record

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Start an async save of `state` and `extra` if `step` is a multiple of save_every (or `force`).

        Returns whether a save started. Steps at or below the latest saved one are skipped (Orbax never
        overwrites a step). Raises NonFiniteState, writing nothing, when a float leaf of `state` or a
        number in `extra` is NaN or Infinity. The first save into a directory that already holds another
        model's checkpoints raises CheckpointError instead of mixing the runs (keep-last-N would delete
        theirs).
        """
        try:
            json.dumps(extra, allow_nan=False)
        except TypeError as e:  # fail here, not in Orbax's background thread
            raise TypeError(f"checkpoint extra must be JSON-serializable: {e}") from None
        except ValueError:
            bad = [k for k, v in extra.items() if isinstance(v, float) and not np.isfinite(v)]
            raise NonFiniteState(
                f"step {step}: refusing to save a checkpoint whose metadata holds a "
                f"non-finite number ({_names(bad) or 'nested'}); {self._untouched()}",
                bad,
            ) from None
        if INTEGRITY_KEY in extra:
            raise ValueError(f"checkpoint extra may not use the reserved key {INTEGRITY_KEY!r}")
        if not force and not self._mgr.should_save(step):
            return False
        if not self._guarded:
            latest, saved = self.newest_readable_extra()
            if latest is not None:
                self._check_fingerprint(latest, saved, extra.get(FINGERPRINT_KEY))
            self._guarded = True
        digests, nonfinite = inspect_state(state, self.rows)
        if nonfinite:
            raise NonFiniteState(
                f"step {step}: refusing to save a checkpoint with NaN or Infinity in "
                f"{_names(nonfinite)}; {self._untouched()}",
                nonfinite,
            )
        record = {"algorithm": DIGEST_ALGORITHM, "leaves": digests, "extra_sha256": extra_sha256(extra)}
        return self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**extra, INTEGRITY_KEY: record})
            ),
            force=force,
        )

    def _untouched(self) -> str:
        steps = self.all_steps()
        return (
            f"the checkpoints in {self.directory} (steps {steps}) are untouched"
            if steps
            else f"nothing was written to {self.directory}"
        )

    # -- restore -------------------------------------------------------------------------------------
    def restore(
        self, step: int | None, abstract_state: Any, *, model_fingerprint: str | None = None
    ) -> Restored:
        """Read `step` (default: the newest good one) into the shardings of `abstract_state`, verified.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))`
        (jax.Arrays work too); the mesh may differ from the one saved. With `model_fingerprint`, the saved
        one must match. With `step=None`, steps that cannot be read back as saved are skipped for the
        next older one (listed in `Restored.skipped`); an explicit step that fails raises
        CheckpointCorrupt, and so does a directory with no good step.
        """
        self.wait()  # a step of ours still being written is not readable yet
        candidates = [self._resolve(step)] if step is not None else list(reversed(self.all_steps()))
        if not candidates:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        skipped: list[tuple[int, str]] = []
        for s in candidates:
            try:
                got = self._restore_one(s, abstract_state, model_fingerprint)
            except CheckpointCorrupt as e:
                skipped.append((s, str(e)))
                continue
            return dataclasses.replace(got, skipped=tuple(skipped))
        why = "; ".join(reason for _, reason in skipped)
        raise CheckpointCorrupt(f"no readable checkpoint in {self.directory}: {why}", tuple(skipped))

    def _restore_one(self, step: int, abstract_state: Any, model_fingerprint: str | None) -> Restored:
        extra, record = self._read_meta(step)
        if model_fingerprint is not None:
            self._check_fingerprint(step, extra, model_fingerprint)
        convert = None
        if self.adapt is not None:  # a state saved in another form: read it as saved, then convert
            adapted = self.adapt(self._saved_shapes(step))
            if adapted is not None:
                abstract_state, convert = adapted
        repadded = self._check_leaves(step, abstract_state)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        failure = None
        try:
            # strict=False lets Orbax pad (with zeros) or truncate the padding rows `_check_leaves`
            # allowed; only then, so that any other shape change still fails.
            restore = ocp.args.StandardRestore(abstract, strict=not repadded)
            state = self._mgr.restore(step, args=ocp.args.Composite(state=restore))["state"]
        except Exception as e:  # noqa: BLE001 - tensorstore raises a bare Exception for truncated data
            failure = _first_line(e)
        if failure is not None:  # outside `except`: the exception's frames no longer hold the failed reads
            _collect_read_echoes()
            raise CheckpointCorrupt(f"step {step}: array data unreadable ({failure})")
        digests, nonfinite = inspect_state(state, self.rows)
        if record is not None:
            saved = record.get("leaves") or {}
            bad = sorted(p for p in digests if saved.get(p) != digests[p])
            if bad:
                raise CheckpointCorrupt(
                    f"step {step}: data does not match the digest saved with it ({_names(bad)})"
                )
        if nonfinite:  # only possible for steps saved before the finiteness check existed
            raise CheckpointCorrupt(f"step {step}: NaN or Infinity in {_names(nonfinite)}")
        if convert is not None:
            state = convert(state)
        return Restored(step=step, state=state, extra=extra, verified=record is not None)

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; available steps: {steps}"
            )
        return int(step)

    def _check_fingerprint(self, step: int, saved_extra: dict[str, Any], mine: str | None) -> None:
        saved = saved_extra.get(FINGERPRINT_KEY)
        if saved != mine:
            raise CheckpointError(
                f"checkpoint directory {self.directory} (step {step}) holds model fingerprint {saved!r}, "
                f"but this run's model has fingerprint {mine!r}. Use a different --checkpoint-dir; the "
                f"existing checkpoints were left untouched."
            )

    def _saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{leaf path: (shape, dtype)} of the state saved at `step`, from its metadata."""
        try:
            meta = _compat.orbax_tree_metadata(self._mgr.item_metadata(step)["state"])
            return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves_by_path(meta).items()}
        except Exception as e:  # noqa: BLE001 - broken or missing array metadata, whatever raised
            raise CheckpointCorrupt(f"step {step}: array metadata unreadable ({_first_line(e)})") from None

    def _check_leaves(self, step: int, abstract_state: Any) -> bool:
        """Raise unless the saved leaves are the wanted ones; whether some differ only in padding rows."""
        shapes = self._saved_shapes(step)
        wanted = leaves_by_path(abstract_state)
        where = f"checkpoint {self.directory} step {step}"
        repadded = False
        missing, unexpected = sorted(wanted.keys() - shapes.keys()), sorted(shapes.keys() - wanted.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{where} has a different state structure: leaves missing from the checkpoint "
                f"{missing[:10]}, leaves in the checkpoint but not in this state {unexpected[:10]}"
            )
        for path, want in wanted.items():
            if getattr(want, "sharding", None) is None:
                raise ValueError(
                    f"abstract_state leaf {path!r} has no sharding; give every leaf one "
                    f"(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...)))"
                )
            w, g = (tuple(want.shape), np.dtype(want.dtype)), shapes[path]
            if w == g:
                continue
            if self._padding_differs(path, w, g):
                repadded = True
                continue
            raise CheckpointError(
                f"{where}: leaf {path!r} expected shape {w[0]} dtype {w[1]}, found shape {g[0]} "
                f"dtype {g[1]} in the checkpoint"
            )
        return repadded

    def _padding_differs(self, path: str, want: tuple, got: tuple) -> bool:
        """Whether two (shape, dtype) of a leaf differ only in the padding rows past its `rows`."""
        n = self.rows.get(path)
        (ws, wd), (gs, gd) = want, got
        return n is not None and wd == gd and ws[1:] == gs[1:] and min(ws[0], gs[0]) >= n

    # -- unreadable steps ----------------------------------------------------------------------------
    def set_aside(self, step: int) -> str:
        """Rename an unreadable step to `<step>.unreadable[-N]` (never deleted: the user may want its
        bytes) so that training can save that step number again; returns the new path."""
        if self.read_only:
            raise CheckpointError(f"set_aside({step}) needs a writable Checkpointer")
        self.wait()
        src = os.path.join(self.directory, str(int(step)))
        dst = src + SET_ASIDE_SUFFIX
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}{SET_ASIDE_SUFFIX}-{n}"
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"codesign-set-aside-{step}")
        self._mgr.reload()  # Orbax caches the step list: forget the renamed step
        return dst

    # -- lifecycle -----------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until any in-flight async save is finalized on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()  # waits for in-flight saves, then stops Orbax's threads

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

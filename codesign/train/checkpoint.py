"""Checkpointing of any pytree of jax.Arrays, on Orbax's CheckpointManager.

Each step directory holds two items: `state` (the array pytree, `StandardSave`, OCDBT/Tensorstore) and
`meta` (JSON: data-loader state, plan spec, model fingerprint, ...). Saves are asynchronous: `save`
returns once the arrays are copied off the devices and the write continues in a background thread.

Crash safety comes from Orbax: a step is written to `<step>.orbax-checkpoint-tmp-<ts>/` and renamed to
`<step>/` only once complete, and step listing ignores the temporary directories. So a process killed
mid-save leaves the previous complete step as the latest; a writer (not `read_only`) removes such
leftovers when it opens the directory.

Restore takes an abstract pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`; Orbax reads each
array straight into the requested sharding, so the mesh and PartitionSpecs may differ from the ones
saved. Before reading any array we check the model fingerprint and every leaf's shape and dtype, and
raise `CheckpointError` on a mismatch. Nothing is ever deleted or overwritten on an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

FINGERPRINT_KEY = "model_fingerprint"


class CheckpointError(ValueError):
    """A checkpoint exists but does not fit this run (model fingerprint, leaf shapes or dtypes)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any  # pytree of jax.Arrays with the requested shardings
    extra: dict[str, Any]  # the JSON metadata saved with the step


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey / FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """'a/b/0'-style path -> leaf; the same string for a dict, list, tuple or nnx.State container,
    because Orbax's metadata tree comes back as plain dicts and lists whatever was saved."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in flat}


class Checkpointer:
    """Async, keep-last-N checkpoints of a state pytree plus JSON metadata."""

    def __init__(self, directory: str | os.PathLike, save_every: int = 1, keep: int = 3,
                 async_save: bool = True, *, read_only: bool = False):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every, self.keep, self.read_only = int(save_every), int(keep), read_only
        options = ocp.CheckpointManagerOptions(
            # Only multiples of save_every (plus Orbax's preemption signal); not InitialSavePolicy,
            # which the default policy adds and which would save whatever step comes first.
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(self.save_every), ocm.PreemptionCheckpointingPolicy()]
            ),
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
        """The JSON metadata of `step` (default: latest), without touching the arrays."""
        step = self._resolve(step)
        meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return dict(meta or {})

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Start an async save of `state` and `extra` if `step` is a multiple of save_every (or `force`).

        Returns whether a save started. Steps at or below the latest saved one are skipped (Orbax never
        overwrites a step). The first save into a directory that already holds another model's
        checkpoints raises CheckpointError instead of mixing the runs (keep-last-N would delete theirs).
        """
        try:
            json.dumps(extra)
        except TypeError as e:  # fail here, not in Orbax's background thread
            raise TypeError(f"checkpoint extra must be JSON-serializable: {e}") from None
        if not force and not self._mgr.should_save(step):
            return False
        if not self._guarded:
            latest = self.latest_step()
            if latest is not None:
                self._check_fingerprint(latest, self.read_extra(latest), extra.get(FINGERPRINT_KEY))
            self._guarded = True
        return self._mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(extra)),
            force=force,
        )

    # -- restore -------------------------------------------------------------------------------------
    def restore(self, step: int | None, abstract_state: Any, *,
                model_fingerprint: str | None = None) -> Restored:
        """Read `step` (default: latest) into the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))`
        (jax.Arrays work too); the mesh may differ from the one saved. With `model_fingerprint`, the saved
        one must match.
        """
        self.wait()  # a step of ours still being written is not readable yet
        step = self._resolve(step)
        extra = self.read_extra(step)
        if model_fingerprint is not None:
            self._check_fingerprint(step, extra, model_fingerprint)
        self._check_leaves(step, abstract_state)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        state = self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        return Restored(step=step, state=state, extra=extra)

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

    def _check_leaves(self, step: int, abstract_state: Any) -> None:
        meta = self._mgr.item_metadata(step)["state"]
        saved = _leaves_by_path(getattr(meta, "tree", meta))
        wanted = _leaves_by_path(abstract_state)
        where = f"checkpoint {self.directory} step {step}"
        missing, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{where} has a different state structure: leaves missing from the checkpoint "
                f"{missing[:10]}, leaves in the checkpoint but not in this state {unexpected[:10]}"
            )
        for path, want in wanted.items():
            if getattr(want, "sharding", None) is None:
                raise ValueError(f"abstract_state leaf {path!r} has no sharding; give every leaf one "
                                 f"(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...)))")
            got = saved[path]
            w = (tuple(want.shape), np.dtype(want.dtype))
            g = (tuple(got.shape), np.dtype(got.dtype))
            if w != g:
                raise CheckpointError(
                    f"{where}: leaf {path!r} expected shape {w[0]} dtype {w[1]}, found shape {g[0]} "
                    f"dtype {g[1]} in the checkpoint"
                )

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

"""Training: executes a chosen Plan.

- `trainer`: `TrainRun` (one run's description) and `run_training`.
- `loop`: the step loop (timing, strict-JSON rows, the non-finite policy, saves).
- `data`: deterministic, resumable, process-sharded token sources (synthetic and memory-mapped file).
- `checkpoint`: Orbax-backed async checkpointing of any pytree of jax.Arrays, with resharded restore, a
  model-fingerprint compatibility check, per-array digests verified on restore, and no non-finite saves.
- `validate`: measured vs estimated step time of a plan's top candidates.
"""

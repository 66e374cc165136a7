"""Training: executes a chosen Plan.

- `data`: deterministic, resumable, process-sharded token sources (synthetic and memory-mapped file).
- `checkpoint`: Orbax-backed async checkpointing of any pytree of jax.Arrays, with resharded restore and a
  model-fingerprint compatibility check.
"""

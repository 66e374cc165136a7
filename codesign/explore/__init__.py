"""The co-design explorer's closed-form and compiled analyses (the sweep lives elsewhere).

Each analysis returns ``{"rows": [...]}`` in the shapes of INTERFACE.md, and has a ``render_*`` that
returns a rich Table for the CLI:

* ``kv_cache_table(models, dtype="bf16")`` / ``render_kv_cache`` - KV cache bytes per token.
* ``flops_table(models, seq_len=4096, compile=True, batch=1)`` / ``render_flops`` - training FLOPs per
  token, analytic (causal and full attention) and counted in the compiled train step.
* ``ep_tpot(model, hardware, assumptions=None, **overrides)`` / ``render_ep_tpot`` - the expert-parallel
  all-to-all bound on decode time per output token.
* ``decode_throughput(model, hardware, contexts, ...)`` / ``render_decode`` - memory-bound decode tokens/s
  per GPU against context length for MHA / GQA / MLA variants.
"""

from codesign.explore.decode import attention_variant, decode_throughput, render_decode
from codesign.explore.ep_tpot import EPAssumptions, ep_tpot, render_ep_tpot
from codesign.explore.flops import (
    analytic_flops_per_token,
    compiled_flops_per_token,
    flops_table,
    render_flops,
)
from codesign.explore.kv_cache import kv_bytes_per_token, kv_cache_table, render_kv_cache

__all__ = [
    "EPAssumptions",
    "analytic_flops_per_token",
    "attention_variant",
    "compiled_flops_per_token",
    "decode_throughput",
    "ep_tpot",
    "flops_table",
    "kv_bytes_per_token",
    "kv_cache_table",
    "render_decode",
    "render_ep_tpot",
    "render_flops",
    "render_kv_cache",
]

"""The closed form: an instrument like the compilers, microseconds per candidate.

`analytic_report` returns the `CompileReport` XLA would give for one pipeline stage of a candidate
(FLOPs, HBM traffic, collectives, memory), so the cost model prices it exactly as it prices a
compile. It sits below both `codesign.compile` (which registers it as the `analytic` target) and
`codesign.cost` (which takes its HBM traffic and accelerator collectives as the stand-in for a CPU
compile of GPU/TPU hardware).
"""

from codesign.closed_form.memory import MemoryEstimate, analytic_memory
from codesign.closed_form.params import Shape, ShardedParam, moe_slots, shape_of, sharded_params, spmd_sizes
from codesign.closed_form.program import analytic_report, fp8_matmul_flops, lowering_for, uses_flash

__all__ = [
    "MemoryEstimate",
    "Shape",
    "ShardedParam",
    "analytic_memory",
    "analytic_report",
    "fp8_matmul_flops",
    "lowering_for",
    "moe_slots",
    "shape_of",
    "sharded_params",
    "spmd_sizes",
    "uses_flash",
]

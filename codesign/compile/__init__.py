"""Compiling candidate layouts with XLA and reading back what the compiler produced.

``hlo`` walks post-optimization HLO text loop-aware (FLOPs, bytes, collectives per step);
``xla_cost`` normalizes ``compiled.cost_analysis()`` across backends and versions.
"""

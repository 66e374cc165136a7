"""Measuring candidate layouts: the compile targets (XLA for cpu, tpu, gpu, attached devices, and the
closed form as `analytic`), the loop-aware HLO walk, the worker processes, the on-disk cache, and the one
measuring loop (`measure`) that every caller goes through.
"""

"""The sharding core: strategies, meshes, logical-axis rules and their enumeration.

Knows model *dimensions* (from ModelConfig) but never imports the Flax models.
"""

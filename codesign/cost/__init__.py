"""The cost model: collective times on network levels, and (elsewhere in this package) step-time estimates."""

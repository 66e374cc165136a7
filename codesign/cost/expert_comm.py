"""The expert all-to-all on the network: node-limited routing, and how much of it a schedule hides.

Node-limited routing (DeepSeek-V3 technical report §2.1.2 and §3.2.2; `ModelConfig.groups_per_token`):
each token's k expert slots land in at most M expert groups. When the expert axis spans nodes
(scale-up domain inside, scale-out network across) and the groups are the nodes, a token crosses the
scale-out network once per destination node, not once per slot, and the receiving GPU forwards it to
the node's experts over the scale-up network. Per device, with B bytes of dispatched slots (k copies of
each token), the scale-out part carries B x M/k (instead of B) through the usual all-to-all over the
nodes, and every slot crosses the scale-up network once (the forwarding). The two run at once (DeepEP
pipelines IB sends with NVLink forwarding), so the time is the larger of the two. Without a limit the
plain hierarchical all-to-all of `codesign.cost.collectives` applies.

Overlap: DualPipe runs the forward chunk of one microbatch next to the backward chunk of another, so
each one's dispatch and combine hide behind the other's compute (DeepSeek-V3 §3.2.1). The expert
all-to-alls are then hideable behind the stage's busy time, up to `room_fraction` of it (the same
room the batch-axis collectives get: the communication kernels share SMs and HBM with the matmuls).
Every other schedule leaves them exposed.
"""

from __future__ import annotations

from collections.abc import Mapping

from codesign.config import ModelConfig
from codesign.cost.collectives import collective_time
from codesign.cost.network import AxisPlacement, collective_time_on_axes
from codesign.sharding.strategy import Strategy

# Schedules that overlap one microbatch's expert all-to-alls with another's compute.
OVERLAPPING_SCHEDULES = frozenset({"dualpipe"})


def expert_all_to_all_time(
    cfg: ModelConfig, bytes_per_device: float, placements: Mapping[str, AxisPlacement]
) -> float:
    """Seconds for one dispatch or combine of `bytes_per_device` over the expert axis."""
    p = placements["expert"]
    m, k = cfg.groups_per_token, cfg.experts_per_token
    if not m or not p.hierarchical or m >= k:
        return collective_time_on_axes("all-to-all", bytes_per_device, ("expert",), placements)
    nodes = p.outer_group_count
    # A group narrower than a node still costs one crossing per node it lives on.
    crossings = min(k, m * max(1, nodes // cfg.expert_groups))
    eff = p.collective_efficiency
    forward = collective_time("all-to-all", bytes_per_device, list(p.spans[:1]), eff)
    scale_out = collective_time("all-to-all", bytes_per_device * crossings / k, list(p.spans[1:]), eff)
    return max(forward, scale_out)


def hides_expert_all_to_all(strategy: Strategy) -> bool:
    return strategy.size("pipeline") > 1 and strategy.schedule in OVERLAPPING_SCHEDULES

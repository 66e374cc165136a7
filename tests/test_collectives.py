"""Alpha-beta collective costs (hand-computed cases) and mesh-axis placement on network levels."""

import pytest

from codesign.cost.collectives import (
    KINDS,
    Span,
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    collective_time,
    permute_time,
    reduce_scatter_time,
    ring_bytes_moved,
)
from codesign.cost.network import assign_levels, collective_time_on_axes
from codesign.hardware import NetworkLevel, load_hardware

GB = 1e9
SW = NetworkLevel("nvlink", 8, bytes_per_s=100e9, latency_s=0.0)
SW_LAT = NetworkLevel("nvlink", 8, bytes_per_s=100e9, latency_s=1e-6)
IB = NetworkLevel("ib", 16, bytes_per_s=10e9, latency_s=0.0)
ICI = NetworkLevel(
    "ici",
    64,
    bytes_per_s=50e9,
    latency_s=0.0,
    topology="torus",
    torus_dims=(4, 4, 4),
    wraps=(True, True, True),
)


def test_ring_all_gather_and_reduce_scatter():
    # (n-1)/n * B / bw + (n-1) * alpha
    assert all_gather_time(GB, Span(SW, 8)) == pytest.approx(7 / 8 * GB / 100e9)
    assert reduce_scatter_time(GB, Span(SW, 8)) == pytest.approx(7 / 8 * GB / 100e9)
    assert all_gather_time(GB, Span(SW_LAT, 8)) == pytest.approx(7 / 8 * GB / 100e9 + 7e-6)


def test_ring_all_reduce_moves_twice():
    assert ring_bytes_moved("all-reduce", GB, 8) == pytest.approx(2 * 7 / 8 * GB)
    assert ring_bytes_moved("all-gather", GB, 8) == pytest.approx(7 / 8 * GB)
    # n = 6 is not a power of two: ring 2(n-1)/n B/bw beats the tree's 2B/bw when latency is 0
    assert all_reduce_time(GB, Span(SW, 6)) == pytest.approx(2 * 5 / 6 * GB / 100e9)


def test_all_reduce_small_message_uses_log_latency():
    # 1 KB on 8 GPUs: halving-doubling pays 2*log2(8) = 6 alphas instead of the ring's 14
    t = all_reduce_time(1e3, Span(SW_LAT, 8))
    assert t == pytest.approx(2 * 7 / 8 * 1e3 / 100e9 + 6e-6)
    assert t < 2 * all_gather_time(1e3, Span(SW_LAT, 8))


def test_torus_wraparound_halves_time():
    open_dim = Span(ICI, 4, dims=(4,), wraps=(False,))
    ring = Span(ICI, 4, dims=(4,), wraps=(True,))
    assert all_gather_time(GB, open_dim) == pytest.approx(3 / 4 * GB / 50e9)
    assert all_gather_time(GB, ring) == pytest.approx(all_gather_time(GB, open_dim) / 2)
    # two wrapped dims: bandwidth adds up (scaling book: x n_axes)
    two = Span(ICI, 16, dims=(4, 4), wraps=(True, True))
    assert all_gather_time(GB, two) == pytest.approx(15 / 16 * GB / (2 * 2 * 50e9))
    # the full 4x4x4 slice by default
    assert Span(ICI, 64).dims == (4, 4, 4)


def test_torus_all_to_all_is_bisection_limited():
    ring = Span(ICI, 8, dims=(8,), wraps=(True,))
    # d*B / (4 * 2w): a quarter of an all-gather of the whole d*B array over W_bidi
    assert all_to_all_time(GB, ring) == pytest.approx(8 * GB / (4 * 2 * 50e9))
    line = Span(ICI, 8, dims=(8,), wraps=(False,))
    assert all_to_all_time(GB, line) == pytest.approx(2 * all_to_all_time(GB, ring))
    # on a switch: (n-1)/n * B / bw
    assert all_to_all_time(GB, Span(SW, 8)) == pytest.approx(7 / 8 * GB / 100e9)


def test_permute_and_aliases():
    assert permute_time(GB, Span(SW_LAT, 8)) == pytest.approx(GB / 100e9 + 1e-6)
    assert collective_time("send-recv", GB, Span(SW, 8)) == permute_time(GB, Span(SW, 8))
    assert collective_time("all_gather", GB, Span(SW, 8)) == all_gather_time(GB, Span(SW, 8))
    with pytest.raises(ValueError, match="unknown collective"):
        collective_time("broadcast-ish", GB, Span(SW, 8))


def test_hierarchical_two_level_all_reduce():
    # 16 GPUs = 2 nodes x 8: reduce-scatter inside, all-reduce of B/8 across, all-gather inside
    t = all_reduce_time(GB, [Span(SW, 8), Span(IB, 2)])
    inside = 7 / 8 * GB / 100e9
    across = 2 * 1 / 2 * (GB / 8) / 10e9
    assert t == pytest.approx(2 * inside + across)
    # all-gather: across on B/8 first, then inside on B
    assert all_gather_time(GB, [Span(SW, 8), Span(IB, 2)]) == pytest.approx(inside + 1 / 2 * GB / 8 / 10e9)
    # all-to-all: the cross-node half of the traffic leaves over each GPU's own NIC
    assert all_to_all_time(GB, [Span(SW, 8), Span(IB, 2)]) == pytest.approx(1 / 2 * GB / 10e9)


@pytest.mark.parametrize("kind", KINDS)
def test_n1_is_free_and_efficiency_slows(kind):
    assert collective_time(kind, GB, Span(SW, 1)) == 0.0
    assert collective_time(kind, GB, []) == 0.0
    fast = collective_time(kind, GB, Span(SW, 8))
    assert collective_time(kind, GB, Span(SW, 8), efficiency=0.5) == pytest.approx(2 * fast)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_more_bandwidth_is_never_slower(kind, n):
    for size in (1e2, 1e6, 1e9):
        prev = None
        for bw in (1e9, 1e10, 1e11, 1e12):
            lv = NetworkLevel("x", n, bytes_per_s=bw, latency_s=2e-6)
            t = collective_time(kind, size, Span(lv, n))
            assert prev is None or t <= prev
            prev = t
        tor = [NetworkLevel("t", n, bytes_per_s=bw, latency_s=1e-6, topology="torus") for bw in (1e10, 1e11)]
        assert collective_time(kind, size, Span(tor[1], n)) <= collective_time(kind, size, Span(tor[0], n))


def test_two_node_h100_mesh_placement():
    pl = assign_levels([("data", 2), ("tensor", 8)], load_hardware("h100"))
    assert pl["tensor"].levels == ("nvlink",) and pl["data"].levels == ("ib",)
    assert pl["tensor"].reason == "tensor=8 rides nvlink (8 GPUs per node)"
    assert pl["data"].reason == "data=2 spans nodes: rides ib"
    assert pl["data"].stride == 8 and not pl["data"].hierarchical
    # gradient all-reduce over both axes is hierarchical and slower than over tensor alone
    both = collective_time_on_axes("all-reduce", GB, ("data", "tensor"), pl)
    assert both > collective_time_on_axes("all-reduce", GB, ("tensor",), pl) > 0


def test_axis_crossing_a_node_is_hierarchical():
    pl = assign_levels([("data", 4), ("tensor", 4)], load_hardware("h100"))
    d = pl["data"]
    assert d.hierarchical and d.levels == ("nvlink", "ib")
    assert (d.inner_group_size, d.outer_group_count) == (2, 2)
    assert "hierarchical" in d.reason


def test_tpu_axes_map_onto_torus_dims():
    pl = assign_levels([("data", 4), ("fsdp", 16), ("tensor", 4)], load_hardware("tpu-v5p"))  # 8x8x4
    t, f, d = pl["tensor"].spans[0], pl["fsdp"].spans[0], pl["data"].spans[0]
    assert (t.dims, t.wraps) == ((4,), (False,))  # half of x: no ring through the wraparound
    assert (f.dims, f.wraps, f.strides) == ((2, 8), (True, True), (4, 1))  # rest of x, all of y
    assert (d.dims, d.wraps) == ((4,), (True,))  # all of z
    assert all(p.levels == ("ici",) for p in pl.values())
    whole = assign_levels([("fsdp", 256)], load_hardware("tpu-v5p"))["fsdp"].spans[0]
    assert whole.dims == (8, 8, 4) and all(whole.wraps)


def test_tpu_multislice_uses_dcn():
    pl = assign_levels([("data", 2), ("fsdp", 256)], load_hardware("tpu-v5e"))
    assert pl["data"].levels == ("dcn",) and pl["fsdp"].levels == ("ici",)
    assert "slices" in pl["data"].reason

"""TPU multi-slice: `--slices K` / `slices:` profiles, data on DCN, refused crossings, DCN cost, the
hybrid mesh, the megascale transfers of a multi-slice compile, and one-line errors for bad counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from codesign import _compat
from codesign.cli import main
from codesign.compile import targets as T
from codesign.compile.devices import libtpu_available
from codesign.compile.hlo import analyze_hlo
from codesign.config import Workload
from codesign.cost.network import assign_levels, collective_time_on_axes
from codesign.hardware import HardwareError, load_hardware
from codesign.model_io import load_model_config
from codesign.planner.search import _orders
from codesign.sharding.enumerate import enumerate_strategies
from codesign.sharding.mesh import MeshSpec, check_slices
from codesign.sharding.slices import SliceError, slice_problem, slice_split
from codesign.sharding.strategy import Strategy, StrategyError


def _mesh(**sizes) -> tuple[tuple[str, int], ...]:
    return Strategy.make(sizes).mesh


# -- hardware: the flag, the profile key, the errors --------------------------------------------------


def test_slices_split_a_tpu_system_into_ici_slices_over_dcn():
    hw = load_hardware("tpu-v5p", 256, slices=2)
    ici, dcn = hw.level("ici"), hw.level("dcn")
    assert hw.slice_count == 2 and ici.group_size == 128 and dcn.group_size == 256
    assert ici.torus_dims == (8, 4, 4) and all(ici.wraps)  # a whole-cube slice keeps its wraparounds
    assert load_hardware("tpu-v5p", 256).slice_count == 1  # one slice when it fits, unless asked
    assert dcn.bytes_per_s == 6.25e9 and "per chip" in dcn.source  # v5p: 50 Gb/s per chip


def test_profile_slices_key_and_flag_override(tmp_path):
    doc = load_hardware("tpu-v5e").to_json()
    doc["slices"] = 2
    path = tmp_path / "v5e-2slices.yaml"
    path.write_text(yaml.safe_dump(doc))
    hw = load_hardware(str(path), 512)
    assert hw.slices == 2 and hw.slice_count == 2 and hw.level("ici").group_size == 256
    assert load_hardware(str(path), 512, slices=4).level("ici").group_size == 128  # the flag wins
    again = type(hw).from_json(hw.to_json())  # what a compile worker receives
    assert again.slice_count == 2


@pytest.mark.parametrize(
    ("name", "devices", "slices", "needle"),
    [
        ("tpu-v5p", 256, 3, "do not split into 3 equal slices"),
        ("tpu-v5p", 96, 2, "no v5p slice has 48 chips"),
        ("h100", 16, 2, "multi-slice is for TPU systems"),
    ],
)
def test_bad_slice_counts_are_one_line_errors(name, devices, slices, needle):
    with pytest.raises(HardwareError) as e:
        load_hardware(name, devices, slices=slices)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_slices_is_one_line_exit_2(capsys):
    rc = main(
        ["plan", "--model", "tiny-dense", "--hardware", "tpu-v5e", "--devices", "8", "--slices", "3"]
        + ["--target", "analytic"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("codesign plan: error: ")
    assert "3 equal slices" in err[0]


# -- placement: data on DCN, other axes refused --------------------------------------------------------


def test_placement_puts_the_data_axis_on_dcn():
    hw = load_hardware("tpu-v5p", 256, slices=2)
    pl = assign_levels(_mesh(data=2, fsdp=64, tensor=2), hw)
    assert pl["data"].levels == ("dcn",) and pl["fsdp"].levels == ("ici",) and pl["tensor"].levels == ("ici",)
    wide = assign_levels(_mesh(data=4, fsdp=32, tensor=2), hw)["data"]  # 2 per slice x 2 slices
    assert wide.levels == ("ici", "dcn") and (wide.inner_group_size, wide.outer_group_count) == (2, 2)
    assert slice_split(_mesh(data=4, fsdp=32, tensor=2), 2)["data"] == (2, 2)


def test_axes_other_than_data_fsdp_pipeline_may_not_cross_slices():
    assert slice_problem(_mesh(data=2, tensor=4), 2) is None
    assert "tensor=8 would cross TPU slices" in slice_problem(_mesh(tensor=8), 2)
    assert "sequence=4 would cross" in slice_problem(_mesh(sequence=4, tensor=2), 2)
    assert slice_problem(_mesh(fsdp=8), 2) is None  # FSDP over DCN is hierarchical, and allowed
    with pytest.raises(SliceError, match="does not split evenly"):
        slice_split((("data", 3), ("tensor", 4)), 2)
    assert issubclass(SliceError, StrategyError)  # printed as a one-line user error


def test_enumeration_and_axis_orders_keep_tensor_inside_a_slice():
    cfg = load_model_config("tiny-dense")
    w = Workload(global_batch=16, seq_len=64)
    one = enumerate_strategies(cfg, w, 8)
    two = enumerate_strategies(cfg, w, 8, slices=2)
    assert len(two.valid) < len(one.valid)
    assert all(slice_problem(s.mesh, 2) is None for s in two.valid)
    assert any("would cross TPU slices" in k for k in two.rejected)
    # The planner's alternative axis orders never move data inside and tensor across slices.
    hw = load_hardware("tpu-v5e", 8, slices=2)
    orders = _orders(Strategy.parse("data=2,tensor=4"), hw)
    assert orders and all(slice_problem(o.mesh, 2) is None for o in orders)


# -- cost: DCN is slower than ICI -------------------------------------------------------------------


def test_a_dcn_collective_costs_more_than_the_same_ici_one():
    mesh = _mesh(data=2, fsdp=128)
    on_ici = assign_levels(mesh, load_hardware("tpu-v5p", 256))
    on_dcn = assign_levels(mesh, load_hardware("tpu-v5p", 256, slices=2))
    nbytes = 1 << 28
    t_ici = collective_time_on_axes("all-reduce", nbytes, ["data"], on_ici)
    t_dcn = collective_time_on_axes("all-reduce", nbytes, ["data"], on_dcn)
    # 2-member all-reduce of B bytes: B/bw on a switch; DCN is 6.25e9 B/s per chip, ICI 9e10 per link.
    assert t_dcn > 5 * t_ici
    assert t_dcn == pytest.approx(
        nbytes / (6.25e9 * load_hardware("tpu-v5p").efficiency.collective), rel=0.05
    )


# -- meshes ----------------------------------------------------------------------------------------------


def _fake_devices(slices: int, per_slice: int):
    return [
        SimpleNamespace(id=s * 100 + i, slice_index=s, platform="cpu", device_kind="cpu", process_index=s)
        for s in range(slices)
        for i in range(per_slice)
    ]


def test_hybrid_mesh_puts_the_slice_index_on_the_outer_part_of_data():
    spec = MeshSpec(_mesh(data=4, fsdp=2, tensor=2))
    ici, dcn = spec.hybrid_shapes(2)
    assert (ici, dcn) == ((1, 2, 2, 1, 1, 2), (1, 2, 1, 1, 1, 1))
    grid = _compat.create_hybrid_device_mesh(ici, dcn, _fake_devices(2, 8)).reshape(spec.shape)
    slice_of = [[d.slice_index for d in row.flat] for row in grid[0]]  # per data index
    assert [set(s) for s in slice_of] == [{0}, {0}, {1}, {1}]  # data's outer half is the slice
    with pytest.raises(SliceError):
        MeshSpec(_mesh(data=2, tensor=8)).hybrid_shapes(4)


def test_check_slices_against_layout_and_devices():
    assert check_slices(_mesh(data=2, fsdp=4), _fake_devices(1, 8), 2) == 2  # emulated: layout only
    with pytest.raises(SliceError):
        check_slices(_mesh(tensor=8), _fake_devices(1, 8), 2)
    with pytest.raises(StrategyError, match="report 2 slices"):
        check_slices(_mesh(data=2, fsdp=4), _fake_devices(2, 4), 4)
    assert check_slices(_mesh(data=2, fsdp=4), _fake_devices(2, 4), None) == 2


# -- the compiled program: megascale transfers are the DCN collectives ---------------------------------

_HLO = """HloModule m, num_partitions=8

ENTRY %main (p: f32[4,128]) -> f32[4,128] {
  %p = f32[4,128]{1,0} parameter(0)
  %ar = f32[4,128]{1,0} all-reduce(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %tok = token[] after-all()
  %send = (f32[4,128]{1,0}, u32[], token[]) send(%ar, %tok), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[4,128]{1,0}, u32[], token[]) recv(%tok), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[4,128]{1,0} add(%ar, %ar)
}
"""


def test_megascale_send_is_an_all_reduce_over_the_axis_that_crosses_slices():
    ids = [s * 100_000 + i for s in (1, 2) for i in range(4)]  # deviceless ids, slice-major
    stats = analyze_hlo(_HLO, [("data", 2), ("fsdp", 4)], ids, multislice=True)
    rows = {(c.kind, c.mesh_axes, c.group_size, c.bytes, c.count, c.network) for c in stats.collectives}
    assert rows == {
        ("all-reduce", ("fsdp",), 4, 2048, 1, "ici"),  # inside each slice
        ("all-reduce", ("data",), 2, 2048, 1, "dcn"),  # the megascale transfer across the 2 slices
    }


def test_each_part_of_a_hierarchical_axis_is_timed_on_its_own_level():
    # data=4 over 2 slices: 2 inside each slice (ICI) x 2 across (DCN); libtpu compiles one collective
    # per part, and each must be timed on its own level only.
    pl = assign_levels(_mesh(data=4, fsdp=64), load_hardware("tpu-v5p", 256, slices=2))
    nbytes = 1 << 26
    whole = collective_time_on_axes("all-reduce", nbytes, ["data"], pl)
    ici = collective_time_on_axes("all-reduce", nbytes, ["data"], pl, network="ici")
    dcn = collective_time_on_axes("all-reduce", nbytes, ["data"], pl, network="dcn")
    assert ici < whole and 5 * ici < dcn  # the ICI part alone, and DCN's whole buffer at DCN speed
    assert dcn == pytest.approx(nbytes / (6.25e9 * pl["data"].collective_efficiency), rel=0.05)


tpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e '.[dev]')")


@tpu
@pytest.mark.slow
def test_two_slice_deviceless_tpu_compile_puts_the_data_axis_on_dcn():
    cfg = load_model_config("tiny-dense")
    w = Workload(global_batch=16, seq_len=128)
    hw = load_hardware("tpu-v5e", 8, slices=2)
    s = Strategy.parse("data=2,fsdp=4")
    report = T.compile_candidate(cfg, w, s, hw, "tpu")
    assert report.outcome == "ok", report.message
    dcn = [c for c in report.collectives if c.mesh_axes == ("data",)]
    assert dcn and all(c.kind == "all-reduce" and c.group_size == 2 for c in dcn)  # the gradient sum
    assert not any("data" in c.mesh_axes and len(c.mesh_axes) > 1 for c in report.collectives)
    from codesign.cost.estimate import estimate_from_report

    est = estimate_from_report(cfg, w, s, hw, report)
    assert any(r.startswith("data=2 spans slices: rides dcn") for r in est.reasons)


def test_maxtext_export_of_a_two_slice_plan_puts_data_on_dcn():
    from codesign.plan_file import Plan
    from codesign.planner.export_maxtext import maxtext_export
    from codesign.presets import get_preset

    cfg = get_preset("llama3-8b")
    hw = load_hardware("tpu-v5p", 256, slices=2)
    plan = Plan(
        model={"name": cfg.name, "config": cfg.to_json()},
        hardware={"name": hw.name, "devices": 256, "slices": 2, "memory_capacity_bytes": 1},
        workload={"global_batch": 512, "seq_len": 2048, "mode": "train", "dtype": "bfloat16"},
        search={},
        candidates=[{"strategy": {"spec": "data=2,fsdp=128,remat=full"}}],
        chosen=0,
    )
    o = maxtext_export(plan, hw).overrides
    assert o["dcn_data_parallelism"] == 2 and o["ici_fsdp_parallelism"] == 128 and o["num_slices"] == 2

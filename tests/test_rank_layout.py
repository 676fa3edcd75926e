"""RankLayout (megatron_vl/parallel/layout.py): coordinates and groups equal DeepSpeed's
topology, a fourth axis needs no other code, size-1 axes give no-op groups."""

import pytest

from megatron_vl.parallel.layout import AXES, RankLayout
from megatron_vl.parallel.mappings import LayoutGroup
from megatron_vl.parallel.state import ParallelState

SHAPES = [(1, 1, 1), (2, 2, 2), (2, 1, 4), (4, 2, 1), (1, 3, 2), (2, 4, 3)]   # (tp, pp, dp)


def _deepspeed(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


def test_tp2_pp2_dp2_exactly():
    layout = RankLayout.of(tp=2, pp=2, dp=2)
    assert layout.axes == (("pp", 2), ("dp", 2), ("tp", 2)) and layout.world_size == 8
    assert [tuple(layout.coordinates(r).values()) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups("pp", "tp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.rank(pp=1, dp=0, tp=1) == 5 and layout.rank(dp=1) == 2
    assert layout.group_of(6, "dp") == [4, 6] and layout.group_of(6, "tp", "pp") == [2, 3, 6, 7]


@pytest.mark.parametrize("tp, pp, dp", SHAPES)
def test_coordinates_and_groups_equal_deepspeed(tp, pp, dp):
    topo = _deepspeed(tp, pp, dp)
    layout = RankLayout.of(tp=tp, pp=pp, dp=dp)
    assert layout.world_size == topo.world_size()
    for rank in range(layout.world_size):
        c = topo.get_coord(rank)
        assert layout.coordinates(rank) == {"pp": c.pipe, "dp": c.data, "tp": c.model}
        assert layout.rank(pp=c.pipe, dp=c.data, tp=c.model) == rank
    # Same lists in the same order: every rank creates groups in this order.
    assert layout.groups("tp") == topo.get_axis_comm_lists("model")
    assert layout.groups("dp") == topo.get_axis_comm_lists("data")
    assert layout.groups("pp") == topo.get_axis_comm_lists("pipe")
    # A model replica: the ranks of one data-parallel index (DeepSpeed's pipeline model group).
    assert layout.groups("pp", "tp") == [sorted(topo.get_axis_list("data", d)) for d in range(dp)]
    # What DeepSpeed's PipelineModule is handed maps ranks exactly as its own topology does.
    assert layout.deepspeed_topology().mapping == topo.mapping


@pytest.mark.parametrize("tp, pp, dp", SHAPES)
def test_parallel_state_coordinates_and_groups(tp, pp, dp):
    layout = RankLayout.of(tp=tp, pp=pp, dp=dp)
    for rank in range(layout.world_size):
        s = ParallelState.layout(tp, pp, dp, rank)
        c = layout.coordinates(rank)
        assert (s.pp_rank, s.dp_rank, s.tp_rank) == s.coordinates == (c["pp"], c["dp"], c["tp"])
        assert s.world_size == tp * pp * dp and s.rank_layout == layout
        assert s.groups == {"tp": layout.groups("tp"), "dp": layout.groups("dp"), "pp": layout.groups("pp"),
                            "mp": layout.groups("pp", "tp")}
        assert (s.is_first_stage, s.is_last_stage) == (c["pp"] == 0, c["pp"] == pp - 1)


def test_a_fourth_axis_is_one_entry():
    """Context parallelism between data and tensor parallelism (Megatron's order): nothing
    but the list of axes changes, and DeepSpeed's generic topology agrees."""
    from deepspeed.runtime.pipe.topology import ProcessTopology
    order = ("pp", "dp", "cp", "tp")
    layout = RankLayout.of(order, pp=2, dp=2, cp=2, tp=2)
    topo = ProcessTopology(axes=["pipe", "data", "context", "model"], dims=[2, 2, 2, 2])
    for rank in range(16):
        c = topo.get_coord(rank)
        assert layout.coordinates(rank) == {"pp": c.pipe, "dp": c.data, "cp": c.context, "tp": c.model}
    assert layout.groups("cp") == topo.get_axis_comm_lists("context")
    assert layout.groups("cp")[:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout.groups("tp") == topo.get_axis_comm_lists("model")
    assert layout.groups("dp") == topo.get_axis_comm_lists("data") == [[0, 4], [1, 5], [2, 6], [3, 7],
                                                                        [8, 12], [9, 13], [10, 14], [11, 15]]
    assert layout.groups("pp") == topo.get_axis_comm_lists("pipe")
    # Gradients of a context-parallel run reduce over data x context: one group per (pp, tp).
    assert layout.groups("dp", "cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert layout.group_of(13, "dp", "cp") == [9, 11, 13, 15]
    # A model replica still spans pp x tp only (cp ranks hold the same weights).
    assert layout.groups("pp", "tp") == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    with pytest.raises(ValueError, match=r"DeepSpeed's pipeline grid has no axis for \['cp'\]"):
        layout.deepspeed_topology()
    # The world size decides the filled axis with the extra axis given like any other.
    assert RankLayout.for_world(32, order=order, tp=2, cp=2, pp=2) == RankLayout.of(order, pp=2, dp=4, cp=2, tp=2)


def test_size_one_axes_give_no_op_groups():
    layout = RankLayout.of(tp=1, pp=2, dp=3)
    assert layout.groups("tp") == [[r] for r in range(6)]
    assert layout.group_of(4, "tp") == [4] and layout.size("tp") == 1
    s = ParallelState.layout(tp=1, pp=2, dp=3, rank=4)
    assert s.tp_group is None and s.mp_group is None
    assert isinstance(s.pp_group, LayoutGroup) and (s.pp_group.size, s.pp_group.rank) == (2, 1)
    assert isinstance(s.dp_group, LayoutGroup) and (s.dp_group.size, s.dp_group.rank) == (3, 1)
    one = ParallelState.build(tp=1, pp=1, world_size=1, rank=0)   # no process group: nothing to create
    assert (one.tp_group, one.pp_group, one.dp_group, one.mp_group, one.self_group) == (None,) * 5
    assert one.groups == {"tp": [[0]], "dp": [[0]], "pp": [[0]], "mp": [[0]]}


def test_layout_errors_name_the_axis():
    assert AXES == ("pp", "dp", "tp")
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp \(4\) x pp \(1\)"):
        RankLayout.for_world(6, tp=4, pp=1)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp \(4\) x pp \(1\)"):
        ParallelState.build(tp=4, pp=1, world_size=6, rank=0)
    with pytest.raises(ValueError, match=r"no axis \['cp'\]"):
        RankLayout.of(cp=2)
    with pytest.raises(ValueError, match=r"has no axis \['cp'\]"):
        RankLayout.of(tp=2).groups("cp")
    with pytest.raises(ValueError, match="tp index 2 outside"):
        RankLayout.of(tp=2).rank(tp=2)
    with pytest.raises(ValueError, match="rank 8 outside a world of 8"):
        RankLayout.of(tp=2, pp=2, dp=2).coordinates(8)
    with pytest.raises(ValueError, match="named twice"):
        RankLayout((("tp", 2), ("tp", 2)))
    with pytest.raises(ValueError, match="axis dp has size 0"):
        RankLayout.of(dp=0)


import pytest
import torch
import torch.distributed as dist

from megatron_vl.parallel.state import ParallelState, group_ranks, rank_coordinates
from megatron_vl.testing.distributed import DistributedFailure, run_distributed


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 4), (2, 1, 2), (2, 2, 2), (4, 2, 1), (2, 4, 3)])
def test_rank_layout_matches_deepspeed_topology(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(tp * pp * dp):
        c = topo.get_coord(rank)
        assert rank_coordinates(rank, tp, pp, dp) == (c.pipe, c.data, c.model)
    ours = group_ranks(tp, pp, dp)
    as_sets = lambda groups: sorted(sorted(g) for g in groups)  # noqa: E731
    assert as_sets(ours["tp"]) == as_sets(topo.get_axis_comm_lists("model"))
    assert as_sets(ours["dp"]) == as_sets(topo.get_axis_comm_lists("data"))
    assert as_sets(ours["pp"]) == as_sets(topo.get_axis_comm_lists("pipe"))


def test_single_process_state_is_noop():
    s = ParallelState.single()
    assert (s.tp, s.pp, s.dp, s.tp_rank, s.pp_rank, s.dp_rank) == (1, 1, 1, 0, 0, 0)
    assert s.tp_group is None and s.dp_group is None and s.is_first_stage and s.is_last_stage
    mpu = s.as_mpu()
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_data_parallel_world_size() == 1


def _check_groups(rank, world):
    state = ParallelState.build(tp=2, pp=2)
    assert state.world_size == 4 and state.dp == 1
    pp_rank, dp_rank, tp_rank = state.coordinates
    assert rank == pp_rank * 2 + tp_rank
    # Each group really contains the ranks the layout says: sum of global ranks over it.
    for group, kind in ((state.tp_group, "tp"), (state.pp_group, "pp")):
        members = next(g for g in state.groups[kind] if rank in g)
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(members), (kind, members, t.item())
    assert state.dp_group is None  # dp = 1: no group, no-op collectives
    mpu = state.as_mpu()
    assert mpu.get_model_parallel_rank() == tp_rank and mpu.get_pipeline_model_parallel_rank() == pp_rank
    assert dist.get_world_size(mpu.get_data_parallel_group()) == 1  # a real one-rank group for DeepSpeed
    assert list(state.stage_layers(4)) == [2 * pp_rank, 2 * pp_rank + 1]
    return state.coordinates


def test_groups_in_four_processes():
    coords = run_distributed(_check_groups, 4)
    assert coords == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]


def _fails_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 now waits for a peer that died


def _hangs(rank, world):
    if rank == 0:
        dist.barrier()
    import time
    time.sleep(600)


def test_harness_reports_failures_and_kills_hangs():
    with pytest.raises(DistributedFailure, match="(?s)rank 1.*ValueError: rank one is broken"):
        run_distributed(_fails_on_rank_one, 2, timeout=60)
    with pytest.raises(DistributedFailure, match=r"did not finish within 8s \(killed\)"):
        run_distributed(_hangs, 2, timeout=8)


def _single_world_mpu(rank, world):
    state = ParallelState.build()
    mpu = state.as_mpu()
    for group in (mpu.get_data_parallel_group(), mpu.get_model_parallel_group(),
                  mpu.get_pipeline_model_parallel_group()):
        assert group is not None and dist.get_world_size(group) == 1


def test_mpu_has_real_groups_in_a_one_process_world():
    run_distributed(_single_world_mpu, 1, timeout=60)

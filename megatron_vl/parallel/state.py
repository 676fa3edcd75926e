"""ParallelState: the tensor/pipeline/data-parallel layout of one rank, built once and passed
down explicitly.

Rank layout is DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``: axes
(pipe, data, model) with model (tensor parallel) varying fastest, so
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. A DeepSpeed ``PipelineModule`` built on
that topology and the groups made here therefore agree on which ranks share a layer shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .launcher import LaunchInfo, detect_launch


def rank_coordinates(rank: int, tp: int, pp: int, dp: int) -> Tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


def coordinates_rank(pp_rank: int, dp_rank: int, tp_rank: int, tp: int, dp: int) -> int:
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def group_ranks(tp: int, pp: int, dp: int) -> Dict[str, List[List[int]]]:
    """Every tensor/pipeline/data-parallel group as a list of global ranks, in a fixed order
    (all ranks must create groups in the same order)."""
    tp_groups = [[coordinates_rank(p, d, t, tp, dp) for t in range(tp)]
                 for p in range(pp) for d in range(dp)]
    dp_groups = [[coordinates_rank(p, d, t, tp, dp) for d in range(dp)]
                 for p in range(pp) for t in range(tp)]
    pp_groups = [[coordinates_rank(p, d, t, tp, dp) for p in range(pp)]
                 for d in range(dp) for t in range(tp)]
    # Ranks that hold one full model replica (all its TP and PP shards): DeepSpeed's
    # "model parallel" group in a pipeline, used to reduce norms across a replica.
    mp_groups = [[coordinates_rank(p, d, t, tp, dp) for p in range(pp) for t in range(tp)]
                 for d in range(dp)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "mp": mp_groups}


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates and its process groups. A group of size 1 is None,
    which every collective in ``megatron_vl.parallel`` treats as a no-op."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None
    # A one-rank group: DeepSpeed calls collectives on whatever group the mpu hands it, so a
    # size-1 axis must still be a real group there (our own collectives skip it).
    self_group: Optional[dist.ProcessGroup] = None
    groups: Dict[str, List[List[int]]] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def coordinates(self) -> Tuple[int, int, int]:
        return rank_coordinates(self.rank, self.tp, self.pp, self.dp)

    @property
    def pp_rank(self) -> int:
        return self.coordinates[0]

    @property
    def dp_rank(self) -> int:
        return self.coordinates[1]

    @property
    def tp_rank(self) -> int:
        return self.coordinates[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no groups: every collective is a no-op."""
        return cls()

    @classmethod
    def layout(cls, tp: int = 1, pp: int = 1, dp: int = 1, rank: int = 0) -> "ParallelState":
        """A rank of a layout without processes (groups are LayoutGroups: sizes and ranks
        only): builds that rank's layers, e.g. on the meta device, and cannot communicate."""
        from .mappings import LayoutGroup
        state = cls(tp=tp, pp=pp, dp=dp, rank=rank, groups=group_ranks(tp, pp, dp))
        pp_rank, dp_rank, tp_rank = state.coordinates
        for attr, size, axis_rank in (("tp_group", tp, tp_rank), ("pp_group", pp, pp_rank), ("dp_group", dp, dp_rank)):
            if size > 1:
                setattr(state, attr, LayoutGroup(size, axis_rank))
        return state

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, world_size: Optional[int] = None,
              rank: Optional[int] = None) -> "ParallelState":
        """Creates the groups for this layout. torch.distributed must be initialised when
        world_size > 1; every rank must call this with the same sizes."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp ({tp}) x pp ({pp})")
        dp = world_size // (tp * pp)
        state = cls(tp=tp, pp=pp, dp=dp, rank=rank, groups=group_ranks(tp, pp, dp))
        if world_size == 1:
            if dist.is_initialized():   # DeepSpeed still wants real groups from the mpu
                state.self_group = dist.new_group([0])
            return state
        for kind, attr in (("tp", "tp_group"), ("dp", "dp_group"), ("pp", "pp_group"), ("mp", "mp_group")):
            for ranks in state.groups[kind]:
                # new_group is collective over the whole world: every rank makes every group.
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    setattr(state, attr, group)
        for r in range(world_size):
            group = dist.new_group([r])
            if r == rank:
                state.self_group = group
        return state

    def stage_layers(self, num_layers: int, pp_rank: Optional[int] = None) -> range:
        """Global indices of the transformer layers that pipeline stage pp_rank holds."""
        per_stage = num_layers // self.pp
        stage = self.pp_rank if pp_rank is None else pp_rank
        return range(stage * per_stage, (stage + 1) * per_stage)

    def as_mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` expects. DeepSpeed's "model
    parallel" here means tensor parallel: ZeRO partitions over the data-parallel group and
    reduces gradient norms over the TP group. It deliberately lacks
    ``initialize_sequence_parallel`` (ZeRO ignores an mpu that has it)."""

    def __init__(self, state: ParallelState):
        self.state = state

    def _world(self, group):
        return group if group is not None else self.state.self_group

    def get_model_parallel_rank(self):
        return self.state.tp_rank

    def get_model_parallel_world_size(self):
        return self.state.tp

    def get_model_parallel_group(self):
        return self._world(self.state.tp_group)

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp

    def get_data_parallel_group(self):
        return self._world(self.state.dp_group)

    def get_pipeline_model_parallel_rank(self):
        return self.state.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.state.pp

    def get_pipeline_model_parallel_group(self):
        return self._world(self.state.pp_group)


def init_distributed(backend: str = "auto", single_process_group: bool = False,
                     launch: Optional[LaunchInfo] = None, timeout_minutes: Optional[float] = None) -> LaunchInfo:
    """Initialises torch.distributed from what the launcher said (parallel/launcher.py:
    torchrun, deepspeed, mpirun, srun; detected here unless `launch` is given) and returns
    it. The launcher's rank, world size, local rank and master address are exported as
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which DeepSpeed reads too. A plain
    ``python script.py`` is one process, which gets a one-rank process group only when
    single_process_group is set (DeepSpeed wants one), on a free local port."""
    launch = launch or detect_launch()
    if launch.launcher != "single":
        launch.export()
    if (launch.world_size > 1 or single_process_group) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        init_method = None
        if launch.launcher == "single":
            # DeepSpeed reads the launcher's variables even for one process.
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            if "MASTER_ADDR" not in os.environ:
                init_method = f"tcp://127.0.0.1:{free_port()}"
        kwargs = {}
        if timeout_minutes:
            import datetime
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                init_method=init_method, **kwargs)
    return launch


def release_shm_name() -> None:
    """Removes the name of this rank's DeepSpeed shared-memory allreduce buffer (CPU runs
    with every rank on one host: /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>,
    ~66 MB). DeepSpeed never unlinks it, so every CPU run leaks one per rank until /dev/shm
    fills. Collective: after the barrier every rank has mapped every buffer, and a mapping
    outlives its name."""
    if not dist.is_initialized():
        return
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for single-process groups and tests)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

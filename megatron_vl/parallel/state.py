"""ParallelState: the tensor/pipeline/data-parallel layout of one rank, built once and passed
down explicitly.

The rank arithmetic is RankLayout's (layout.py): axes (pp, dp, tp), tensor parallel varying
fastest, DeepSpeed's ``PipeModelDataParallelTopology`` order, so
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. A DeepSpeed ``PipelineModule`` built on
that topology and the groups made here therefore agree on which ranks share a layer shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .launcher import LaunchInfo, detect_launch
from .layout import AXES, RankLayout


def rank_coordinates(rank: int, tp: int, pp: int, dp: int) -> Tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank."""
    c = RankLayout.of(tp=tp, pp=pp, dp=dp).coordinates(rank)
    return c["pp"], c["dp"], c["tp"]


def group_ranks(tp: int, pp: int, dp: int) -> Dict[str, List[List[int]]]:
    """Every group of ParallelState.GROUP_AXES as lists of global ranks, in a fixed order
    (all ranks must create groups in the same order)."""
    return ParallelState.group_lists(RankLayout.of(tp=tp, pp=pp, dp=dp))


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates and its process groups. A group of size 1 is None,
    which every collective in ``megatron_vl.parallel`` treats as a no-op."""

    GROUP_AXES: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "tp": ("tp",), "dp": ("dp",), "pp": ("pp",),
        # Ranks that hold one full model replica (all its TP and PP shards): DeepSpeed's
        # "model parallel" group in a pipeline, used to reduce norms across a replica.
        "mp": ("pp", "tp"),
    }
    """Group kind -> the axes its ranks differ along; the kind's process group is the field
    `<kind>_group`. Groups are created in this order."""

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
    def rank_layout(self) -> RankLayout:
        return RankLayout(tuple((name, getattr(self, name)) for name in AXES))

    @classmethod
    def group_lists(cls, layout: RankLayout) -> Dict[str, List[List[int]]]:
        return {kind: layout.groups(*axes) for kind, axes in cls.GROUP_AXES.items()}

    @property
    def world_size(self) -> int:
        return self.rank_layout.world_size

    @property
    def coordinates(self) -> Tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank)."""
        c = self.rank_layout.coordinates(self.rank)
        return c["pp"], c["dp"], c["tp"]

    def axis_rank(self, name: str) -> int:
        """This rank's index along axis `name`."""
        return self.rank_layout.coordinates(self.rank)[name]

    @property
    def pp_rank(self) -> int:
        return self.axis_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.axis_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self.axis_rank("tp")

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
    def of_layout(cls, layout: RankLayout, rank: int) -> "ParallelState":
        """Rank `rank` of `layout`, its group lists filled in, no process groups yet."""
        return cls(rank=rank, groups=cls.group_lists(layout), **layout.sizes)

    @classmethod
    def layout(cls, tp: int = 1, pp: int = 1, dp: int = 1, rank: int = 0) -> "ParallelState":
        """A rank of a layout without processes (groups are LayoutGroups: sizes and ranks
        only): builds that rank's layers, e.g. on the meta device, and cannot communicate."""
        from .mappings import LayoutGroup
        state = cls.of_layout(RankLayout.of(tp=tp, pp=pp, dp=dp), rank)
        for name in AXES:   # the one-axis groups (what layers read), not the replica group
            size = getattr(state, name)
            if size > 1:
                setattr(state, f"{name}_group", LayoutGroup(size, state.axis_rank(name)))
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
        state = cls.of_layout(RankLayout.for_world(world_size, tp=tp, pp=pp), rank)
        if world_size == 1:
            if dist.is_initialized():   # DeepSpeed still wants real groups from the mpu
                state.self_group = dist.new_group([0])
            return state
        for kind, lists in state.groups.items():
            for ranks in lists:
                # new_group is collective over the whole world: every rank makes every group.
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    setattr(state, f"{kind}_group", group)
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

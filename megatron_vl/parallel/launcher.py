"""Which launcher started this process, and what it says about rank, world size, local rank
and the rendezvous address — the one place that reads launcher environments.

Precedence, most specific first:

1. ``RANK``/``WORLD_SIZE`` set: ``torchrun`` (it also sets ``TORCHELASTIC_RUN_ID``), the
   ``deepspeed`` launcher (its launch.py also sets ``CROSS_RANK``/``LOCAL_SIZE``), or variables
   set by hand / by another launcher. ``MASTER_ADDR``/``MASTER_PORT`` come with them.
2. An MPI launcher (``mpirun``/``mpiexec``): Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Intel
   MPI's ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``, or PMIx's ``PMIX_RANK``. MPI does not
   name a rendezvous address: with mpi4py installed rank 0 broadcasts its host and a free
   port; without it ``MASTER_ADDR`` must be exported (``mpirun -x MASTER_ADDR=...``), or
   the job must fit on one node, or run inside a SLURM allocation (first host of its list).
   MPI comes before SLURM because ``mpirun`` inside an ``sbatch`` script leaves the batch
   step's ``SLURM_PROCID`` (0) in every rank's environment.
3. SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS`` (or
   ``SLURM_NTASKS``); the master is the first host of the step's node list (``node[01-04]``
   syntax expanded here, no ``scontrol`` needed) and the port is derived from the job id, so
   every task computes the same one without talking.
4. Nothing: one process.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, List, Mapping, MutableMapping, Optional

from ..errors import UsageError

DEFAULT_PORT = 29500


class LaunchError(UsageError, RuntimeError):
    pass


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str        # torchrun | deepspeed | env | mpi | slurm | single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    detail: str = ""
    # Why no rendezvous is possible (no address across nodes); raised by export(), not by
    # detection, so that a run refuses bad settings before it complains about the network.
    problem: str = ""

    def describe(self) -> str:
        where = f"{self.master_addr}:{self.master_port}" if self.world_size > 1 else "no rendezvous"
        extra = f", {self.detail}" if self.detail else ""
        return (f"launcher: {self.launcher} (rank {self.rank} of {self.world_size}, local rank {self.local_rank}, "
                f"master {where}{extra})")

    def export(self, env: MutableMapping[str, str] = os.environ) -> None:
        """Writes the torch.distributed variables, which DeepSpeed reads as well."""
        if self.problem:
            raise LaunchError(self.problem)
        env.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                    "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)})


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list -> host names: ``gpu[01-03,07],login-a`` ->
    gpu01 gpu02 gpu03 gpu07 login-a (zero padding kept; several bracket groups multiply)."""
    hosts: List[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [text]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise LaunchError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
                    for n in range(int(lo), int(hi or lo) + 1):
                        choices.append(text + str(n).zfill(len(lo)))
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(h for h in expanded if h)
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def _int(env: Mapping[str, str], *keys: str) -> Optional[int]:
    for key in keys:
        value = env.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"environment variable {key}={value!r} is not an integer") from None
    return None


def _slurm_hosts(env: Mapping[str, str]) -> Optional[List[str]]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return expand_nodelist(nodelist) if nodelist else None


def _slurm_port(env: Mapping[str, str]) -> int:
    job = _int(env, "SLURM_JOB_ID", "SLURM_JOBID")
    return DEFAULT_PORT if job is None else 20000 + job % 40000


def _from_rank_env(env: Mapping[str, str]) -> LaunchInfo:
    if "TORCHELASTIC_RUN_ID" in env:
        launcher, detail = "torchrun", f"node rank {env.get('GROUP_RANK', '0')}"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher, detail = "deepspeed", f"node {env.get('CROSS_RANK', '0')} of {env.get('CROSS_SIZE', '1')}"
    else:
        launcher, detail = "env", "RANK/WORLD_SIZE set by hand or another launcher"
    world = _int(env, "WORLD_SIZE")
    rank = _int(env, "RANK")
    if world is None:
        raise LaunchError("RANK is set but WORLD_SIZE is not")
    local = _int(env, "LOCAL_RANK")
    addr = env.get("MASTER_ADDR")
    problem = f"{launcher}: WORLD_SIZE={world} but MASTER_ADDR is not set" if world > 1 and not addr else ""
    return LaunchInfo(launcher, rank, world, rank if local is None else local, addr or "?",
                      _int(env, "MASTER_PORT") or DEFAULT_PORT, detail, problem)


MPI_RANK_KEYS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _mpi_rendezvous_from_mpi4py():
    """(host, port) of rank 0, broadcast over MPI; None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        ours = (socket.gethostname(), port)
    else:
        ours = None
    return comm.bcast(ours, root=0)


def _from_mpi(env: Mapping[str, str], rendezvous: Callable[[], Optional[tuple]]) -> LaunchInfo:
    rank = _int(env, *MPI_RANK_KEYS)
    world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_NPROCS")
    if world is None:
        raise LaunchError("an MPI rank variable is set but no world size (OMPI_COMM_WORLD_SIZE / PMI_SIZE)")
    local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    flavour = "Open MPI" if "OMPI_COMM_WORLD_RANK" in env else "PMIx" if "PMIX_RANK" in env else "MPICH/PMI"
    addr, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    source = "MASTER_ADDR"
    if not addr:
        found = rendezvous()
        if found is not None:
            addr, port, source = found[0], port or found[1], "mpi4py broadcast"
        elif world == 1 or (local_size is not None and local_size == world):
            addr, source = "127.0.0.1", "one node"
        elif (hosts := _slurm_hosts(env)):
            addr, port, source = hosts[0], port or _slurm_port(env), "SLURM node list"
        else:
            return LaunchInfo("mpi", rank, world, rank if local is None else local, "?", port or DEFAULT_PORT,
                              flavour, f"{flavour} launch across nodes without a rendezvous address: install "
                              "mpi4py (pip install mpi4py) or export MASTER_ADDR/MASTER_PORT to every rank "
                              "(mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...)")
    return LaunchInfo("mpi", rank, world, rank if local is None else local, addr, port or DEFAULT_PORT,
                      f"{flavour}, rendezvous from {source}")


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world is None:
        raise LaunchError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS")
    local = _int(env, "SLURM_LOCALID")
    addr = env.get("MASTER_ADDR")
    hosts = _slurm_hosts(env)
    problem = ""
    if not addr:
        if hosts is None and world > 1:
            problem = "SLURM: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to take the master host from; export MASTER_ADDR"
        addr = hosts[0] if hosts else "127.0.0.1" if world == 1 else "?"
    port = _int(env, "MASTER_PORT") or _slurm_port(env)
    detail = f"job {env.get('SLURM_JOB_ID', '?')}, {len(hosts) if hosts else 1} node(s)"
    return LaunchInfo("slurm", rank, world, rank if local is None else local, addr, port, detail, problem)


def detect_launch(env: Optional[Mapping[str, str]] = None,
                  mpi_rendezvous: Callable[[], Optional[tuple]] = _mpi_rendezvous_from_mpi4py) -> LaunchInfo:
    """LaunchInfo from the environment (os.environ by default); see the module docstring."""
    env = os.environ if env is None else env
    if "RANK" in env:
        info = _from_rank_env(env)
    elif any(k in env for k in MPI_RANK_KEYS):
        info = _from_mpi(env, mpi_rendezvous)
    elif "SLURM_PROCID" in env:
        info = _from_slurm(env)
    else:
        return LaunchInfo("single", 0, 1, _int(env, "LOCAL_RANK") or 0, env.get("MASTER_ADDR", "127.0.0.1"),
                          _int(env, "MASTER_PORT") or DEFAULT_PORT)
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{info.launcher}: rank {info.rank} is outside world size {info.world_size}")
    return info

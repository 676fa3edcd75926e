"""Run one function in N gloo processes and report every rank's failure.

Used by the test-suite (several checks share one spawn: pass a function that runs them all)
and usable by anyone debugging a collective: ``run_distributed(fn, 2, arg)``. Each child
gets one thread, a free port on loopback, an initialised gloo process group and a clean
exit (barrier, destroy_process_group); the parent kills every child when the timeout hits,
so a hung collective fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Dict, List

from ..parallel.state import free_port, release_shm_name
from .processes import kill_with_descendants

__all__ = ["DistributedFailure", "free_port", "one_rank_job", "run_distributed"]


class DistributedFailure(AssertionError):
    pass


def one_rank_job(job: Callable[[], Any], env_setter: Callable[[str, str], None] = os.environ.__setitem__):
    """Runs job() in this process as a one-rank launch (what a launcher would export, through
    env_setter, e.g. pytest's monkeypatch.setenv), then tears its process group down and
    forgets the groups DeepSpeed caches in module globals, so a next job here makes new ones
    (a stale group fails DeepSpeed's next initialize: "Group ... is not registered")."""
    import torch.distributed as dist
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        env_setter(key, value)
    try:
        return job()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        from deepspeed.utils import groups
        for name, value in vars(groups).items():
            if isinstance(value, dist.ProcessGroup):
                setattr(groups, name, None)
            elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
                value.clear()
        groups.mpu = None   # the job's mpu (our ParallelState) holds its groups too


def _child(fn, rank, world_size, port, args, results):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        release_shm_name()   # collective: a barrier, then this rank's DeepSpeed buffer name
        results.put((rank, "ok", value))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 240.0) -> List[Any]:
    """Runs fn(rank, world_size, *args) in world_size processes; returns each rank's return
    value (rank order). Raises DistributedFailure with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: Dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
                outcome[rank] = (status, value)
                if status == "error":
                    # Its peers may block forever in a collective: a short grace, then kill.
                    deadline = min(deadline, time.monotonic() + 15.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and i not in outcome]
                if dead:
                    time.sleep(0.5)  # let a dying rank's report arrive
                    while not results.empty():
                        rank, status, value = results.get()
                        outcome[rank] = (status, value)
                    for i in dead:
                        outcome.setdefault(i, ("error", f"process exited with code {procs[i].exitcode}"))
                    # Peers of a crashed rank block in a collective: stop waiting for them.
                    break
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                kill_with_descendants(p.pid)   # a rank's own children (data workers) go with it
                p.join()
    failures = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        why = "after a peer failed" if failures else f"within {timeout:.0f}s"
        failures.append(f"ranks {missing} did not finish {why} (killed)")
    if failures:
        raise DistributedFailure("distributed run failed:\n" + "\n".join(failures))
    return [outcome[r][1] for r in range(world_size)]

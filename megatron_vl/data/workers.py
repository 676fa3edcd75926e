"""Preprocessing's worker processes: batches of records encoded in order, with a bounded
number in flight, and a worker's death reported instead of waited on.

multiprocessing.Pool does not notice a worker killed from outside (the kernel's OOM killer
sends SIGKILL): its results never come and the parent waits forever, holding the prefix's
lock. concurrent.futures.ProcessPoolExecutor marks itself broken when a worker dies; that is
turned into one line naming the worker's exit and the input it was encoding.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Dict, Iterable, Iterator, Sequence

from ..errors import UserError


class WorkerDied(UserError):
    """A worker process ended while records were being encoded (exit 1)."""


def describe_exit(code) -> str:
    if code is None:
        return "ended without an exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        how = f"killed by signal {-code} ({name}"
        return how + (": likely the out-of-memory killer)" if -code == signal.SIGKILL else ")")
    return f"exited with code {code}"


def _start_worker(parent: int, initializer: Callable, initargs: Sequence) -> None:
    """A worker's start: it ends itself when its parent is gone (killed with -9, nothing told
    the workers), instead of waiting on the task queue forever."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    initializer(*initargs)


class EncodePool:
    """`fn(batch) -> [result per task]` over `workers` spawned processes; `imap` yields the
    results of `tasks` in order, keeping at most a few batches per worker in flight (memory
    stays flat however large the input)."""

    def __init__(self, workers: int, fn: Callable, initializer: Callable, initargs: Sequence, batch: int = 64):
        self.fn, self.batch, self.window = fn, batch, 2 * workers + 2
        self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                            initargs=(os.getpid(), initializer, tuple(initargs)))
        self.processes: Dict[int, object] = {}   # every worker seen, to name the one that died

    def _note_processes(self) -> None:
        self.processes.update(getattr(self.executor, "_processes", None) or {})

    def imap(self, tasks: Iterable, source: str, prefix: str, where: Callable = str) -> Iterator:
        """`where(task)` names a task's record in the message if a worker dies."""
        pending = collections.deque()
        tasks = iter(tasks)
        first = None
        while True:
            try:
                while len(pending) < self.window:
                    chunk = list(itertools.islice(tasks, self.batch))
                    if not chunk:
                        break
                    first = first if pending else chunk[0]
                    pending.append((chunk[0], self.executor.submit(self.fn, chunk)))
                    self._note_processes()
                if not pending:
                    return
                first, future = pending[0]
                results = future.result()
            except BrokenProcessPool:
                raise WorkerDied(self._death(source, where(first) if first is not None else None, prefix)) from None
            pending.popleft()
            yield from results

    def _death(self, source: str, where, prefix: str) -> str:
        self._note_processes()
        dead = [(pid, p.exitcode) for pid, p in self.processes.items() if p.exitcode is not None]
        # The executor terminates the survivors (SIGTERM) once one has died: name the first cause.
        cause = [d for d in dead if d[1] != -signal.SIGTERM] or dead
        who = (f"worker process {cause[0][0]} {describe_exit(cause[0][1])}" if cause
               else "a worker process ended abruptly")
        at = f" (the batch from {where})" if where else ""
        return (f"preprocessing stopped: {who} while encoding {source}{at}; nothing was written to {prefix}; "
                "run again with fewer --workers or more memory")

    def close(self) -> None:
        """Ends the workers now (finished or not): nothing of theirs is needed any more."""
        self._note_processes()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in self.processes.values():   # idle workers leave at once on the shutdown
            p.join(timeout=1)
        for p in self.processes.values():   # busy ones (an error stopped the run) are ended
            if p.exitcode is None:
                p.terminate()
                p.join(timeout=5)

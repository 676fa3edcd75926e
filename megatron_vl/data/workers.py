"""Preprocessing's worker processes: batches of records encoded in order, with a bounded
number in flight, and a worker's death reported instead of waited on.

multiprocessing.Pool does not notice a worker killed from outside (the kernel's OOM killer
sends SIGKILL): its results never come and the parent waits forever, holding the prefix's
lock. concurrent.futures.ProcessPoolExecutor notices most of the time, but a worker killed
while it writes a result leaves half a message in the shared result pipe, and the executor's
thread then waits for the rest forever (CPython 3.11, measured here: about one kill in ten).
So each worker has a pipe of its own, which only it writes: when it dies the pipe reads as
ended, half a message or not, and its process sentinel fires; the parent waits on both and
turns either into one line naming the worker's exit and the records it was encoding.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

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


def _serve(parent: int, conn, fn: Callable, initializer: Callable, initargs: Sequence) -> None:
    """A worker: (seq, batch) in, (status, seq, results or exception) out, until None or EOF.
    It ends itself when its parent is gone (killed with -9, nothing told the workers) instead
    of waiting on its pipe forever, and leaves Ctrl-C to the parent, which ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    try:
        initializer(*initargs)
    except BaseException as exc:   # e.g. a tokenizer that does not load: the parent raises it
        conn.send(("error", -1, exc))
        return
    conn.send(("ready", -1, None))   # until then the parent encodes (EncodePool.imap)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        seq, batch = message
        try:
            reply = ("ok", seq, fn(batch))
        except BaseException as exc:
            reply = ("error", seq, exc)
        try:
            conn.send(reply)
        except Exception as exc:   # an exception that does not pickle: its text does
            conn.send(("error", seq, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({exc})")))


class _Worker:
    def __init__(self, process, conn):
        self.process, self.conn = process, conn
        self.in_flight: collections.deque = collections.deque()   # (seq, first task of the batch)
        self.ready = None   # (seq, batch) read from the input, sent when the worker is free
        self.started = False   # it said "ready": its initializer ran


class EncodePool:
    """`fn(batch) -> [result per task]` over `workers` spawned processes; `imap` yields the
    results of `tasks` in order, with two batches per worker at most (one encoding, one read
    ahead): memory stays flat however large the input. `local(task) -> result`, when given,
    is the same work done in this process: it encodes while the workers start."""

    def __init__(self, workers: int, fn: Callable, initializer: Callable, initargs: Sequence, batch: int = 64,
                 local: Optional[Callable] = None):
        ctx = mp.get_context("spawn")
        self.batch, self.local = batch, local
        self.workers: List[_Worker] = []
        try:
            for _ in range(workers):
                here, there = ctx.Pipe(duplex=True)
                process = ctx.Process(target=_serve, args=(os.getpid(), there, fn, initializer, tuple(initargs)),
                                      daemon=True, name="preprocess-worker")
                process.start()
                there.close()   # only the worker holds its end: its death reads as the pipe's end
                self.workers.append(_Worker(process, here))
        except BaseException:
            self.close()
            raise

    def imap(self, tasks: Iterable, source: str, prefix: str, where: Callable = str) -> Iterator:
        """`where(task)` names a task's record in the message if a worker dies.

        One batch in each worker's pipe at a time: a worker then never writes a result while
        the parent is blocked writing it a task (both pipes full: a deadlock with large
        records). The next batch of each worker is read from the input while it works.

        A worker gets its first batch once it says it is ready. Until all are (a spawned
        interpreter imports for a few tenths of a second), the parent encodes with `local` the
        first tasks of the earliest batch waiting, one task between two looks at the workers, so
        a started worker waits one task at most; the rest of that batch goes to a worker. So
        workers cost a short input nothing, and pay off from fewer documents."""
        tasks = iter(tasks)
        done: Dict[int, list] = {}
        heads: Dict[int, list] = {}   # results of a batch's first tasks, encoded here
        next_seq = next_out = 0
        exhausted = False
        while True:
            for w in self.workers:
                if w.ready is None and not exhausted:
                    chunk = list(itertools.islice(tasks, self.batch))
                    if chunk:
                        w.ready = (next_seq, chunk)
                        next_seq += 1
                    else:
                        exhausted = True
                if w.started and not w.in_flight and w.ready is not None:
                    seq, chunk = w.ready
                    w.in_flight.append((seq, chunk[0]))
                    w.ready = None
                    try:
                        w.conn.send((seq, chunk))
                    except OSError:   # its reading end closed: it died
                        raise self._died(w, source, prefix, where) from None
            while next_out in done:
                yield from done.pop(next_out)
                next_out += 1
            if exhausted and not done and not any(w.ready or w.in_flight for w in self.workers):
                return
            watched = [w for w in self.workers if w.in_flight or not w.started]
            if not watched:
                continue
            waiting = [w for w in self.workers if w.ready is not None]
            timeout = None
            if self.local is not None and waiting and not all(w.started for w in self.workers):
                w = min(waiting, key=lambda w: w.ready[0])
                seq, chunk = w.ready
                heads.setdefault(seq, []).append(self.local(chunk.pop(0)))
                if not chunk:
                    done[seq], w.ready = heads.pop(seq), None
                timeout = 0
            ready = wait([w.process.sentinel for w in watched] + [w.conn for w in watched], timeout)
            for w in watched:
                if w.conn in ready:
                    try:
                        status, seq, value = w.conn.recv()
                    except (EOFError, OSError):
                        raise self._died(w, source, prefix, where) from None
                    if status == "error":
                        raise value
                    if status == "ready":
                        w.started = True
                        continue
                    w.in_flight.popleft()
                    done[seq] = heads.pop(seq, []) + value
                elif w.process.sentinel in ready:
                    raise self._died(w, source, prefix, where)

    def _died(self, w: _Worker, source: str, prefix: str, where: Callable) -> BaseException:
        w.process.join(timeout=5)
        if w.process.exitcode is not None:
            # What it said before it ended (a tokenizer that did not load, say) is the cause. Its
            # end of the pipe is closed, so half a message reads as the end, never as a wait.
            try:
                while w.conn.poll(0):
                    status, _, value = w.conn.recv()
                    if status == "error":
                        return value
            except (EOFError, OSError, ValueError):
                pass
        # The batch it was encoding, or (it died starting) the one it was to get.
        first = w.in_flight[0][1] if w.in_flight else w.ready[1][0] if w.ready else None
        at = f" (the batch from {where(first)})" if first is not None else ""
        return WorkerDied(f"preprocessing stopped: worker process {w.process.pid} {describe_exit(w.process.exitcode)} "
                          f"while encoding {source}{at}; nothing was written to {prefix}; run again with fewer "
                          "--workers or more memory")

    def close(self) -> None:
        """Ends the workers now (finished or not): nothing of theirs is needed any more."""
        for w in self.workers:
            if not w.started:   # still starting (a short input was done without it): it holds nothing
                w.process.terminate()
            elif not w.in_flight:   # a busy one may not read: it is ended below instead
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self.workers:   # idle workers leave at once
            w.process.join(timeout=1)
        for w in self.workers:   # busy ones (an error stopped the run) are ended
            if w.process.exitcode is None:
                w.process.terminate()
                w.process.join(timeout=5)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()

"""Records encoded on several threads of one process, their results in input order.

Encoding a text record is mostly time outside the GIL: SentencePiece releases it while it
encodes (measured: a Python thread keeps 90% of its speed beside an encoding one). So a
process encodes text on one thread per CPU it may use, without the start-up and the pickling
of worker processes; the GIL-held rest (JSON, the record's report, the writer) stays on one
core. Records with images are not put on threads (preprocess.py): PIL parses image headers
in Python, holding the GIL. The CPUs are the process's affinity mask: ``taskset -c 0`` runs
it on one.
"""

from __future__ import annotations

import collections
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, List, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """Encoding threads for each of `processes` tokenizing processes: the usable CPUs shared out."""
    return max(1, usable_cpus() // max(1, processes))


def _run_chunk(fn: Callable[[T], R], chunk: List[T]):
    """(results, None), or (the results before the item that raised, its exception)."""
    results: List[R] = []
    try:
        for item in chunk:
            results.append(fn(item))
    except BaseException as exc:   # noqa: BLE001 - raised by the consumer, at the item's place
        return results, exc
    return results, None


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, chunk: int = 16) -> Iterator[R]:
    """map(fn, items) on `threads` threads, yielding in input order. `items` is drawn on the
    calling thread (a reader's report stays single-threaded), `chunk` at a time, with two
    chunks per thread in flight at most: memory stays flat however long the input. An
    exception of fn is raised at its item's place, after the items before it were yielded."""
    if threads <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="encode") as pool:
        def submit() -> bool:
            batch = list(itertools.islice(items, chunk))
            if batch:
                pending.append(pool.submit(_run_chunk, fn, batch))
            return bool(batch)

        more = True
        try:
            while more and len(pending) < 2 * threads:
                more = submit()
            while pending:
                results, error = pending.popleft().result()
                if more and error is None:
                    more = submit()
                yield from results
                if error is not None:
                    raise error
        finally:   # an error or an abandoned consumer: what has not started never will
            for future in pending:
                future.cancel()

"""The acceptance script's frame (benchmarks/gpu_acceptance.py): checks run one after another
in a time budget, each in a child process under its own timeout (a hung kernel or an
out-of-memory crash ends one check, not the run), results as a table and as a JSON report
written whole (temporary name, then rename). Generic, so the frame is tested on CPU with
stand-in checks (tests/test_gpu_acceptance.py)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Sequence

from ..atomic import atomic_open

PASS, BELOW_GOAL, FAIL, TIMEOUT, NOT_RUN = "pass", "below goal", "fail", "timeout", "not run"
FAILED = (FAIL, TIMEOUT, NOT_RUN)
"""Statuses that make the script exit non-zero. BELOW_GOAL (a measured figure short of its
goal: MFU, the planner's memory error) is reported, and fails nothing by itself."""


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    """What it shows, one line."""
    timeout: float
    """Seconds it may run (its child process is killed with everything it started after that)."""
    runs: str
    """The command or configuration it runs, as the dry run lists it."""


@dataclass
class Result:
    name: str
    status: str
    summary: str
    """One line for the table."""
    seconds: float = 0.0
    details: Dict = field(default_factory=dict)
    """Figures and per-item outcomes, as they go into the JSON report."""


def run_checks(checks: Sequence[Check], run_one: Callable[[Check, float], Result], budget_s: float,
               log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> List[Result]:
    """Each check in turn, under min(its timeout, the budget left); a check that would start with
    under 10 s of budget left is not run. A check that raises fails with the error's text."""
    start, results = clock(), []
    for check in checks:
        left = budget_s - (clock() - start)
        if left < 10:
            results.append(Result(check.name, NOT_RUN, f"not run: {max(left, 0):.0f} s of the {budget_s:.0f} s "
                                                       "budget left"))
            continue
        log(f"== {check.name}: {check.title} (up to {min(check.timeout, left):.0f} s)")
        t0 = clock()
        try:
            result = run_one(check, min(check.timeout, left))
        except Exception as exc:   # a check's own failure is its row, not the end of the run
            result = Result(check.name, FAIL, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        result.seconds = round(clock() - t0, 1)
        log(f"   {result.status}: {result.summary} ({result.seconds:.0f} s)")
        results.append(result)
    return results


def exit_code(results: Sequence[Result]) -> int:
    return 1 if any(r.status in FAILED for r in results) else 0


def table(results: Sequence[Result]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':<{width}}  {'status':<10}  {'time':>6}  result", "-" * (width + 40)]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status:<10}  {r.seconds:5.0f}s  {r.summary}")
    failed = [r.name for r in results if r.status in FAILED]
    below = [r.name for r in results if r.status == BELOW_GOAL]
    lines.append(f"{len(results)} checks: " + (f"FAILED {', '.join(failed)}" if failed else "none failed")
                 + (f"; below goal: {', '.join(below)}" if below else ""))
    return "\n".join(lines)


def write_report(path: str, results: Sequence[Result], meta: Dict) -> None:
    """The report as JSON ({"meta": ..., "checks": [...], "exit_code": n}), written under a
    temporary name and renamed: a reader never sees half a report."""
    report = {"meta": meta, "checks": [asdict(r) for r in results], "exit_code": exit_code(results)}
    with atomic_open(path) as fh:
        json.dump(report, fh, indent=1, default=str)
        fh.write("\n")

"""Two runs' losses compared step by step within a stated tolerance: a fused-kernel run
against the torch reference on the same batches, same seed (tests/test_pretrain_gpu.py,
benchmarks/gpu_acceptance.py). The same function passes two CPU runs that take the same path
and refuses a pair that drifts apart, which tests/test_pretrain_gpu.py and
tests/test_gpu_acceptance.py show on CPU.

Tolerances: |a - b| <= rtol * |b| at every step. The first step compares forward passes on
identical weights; later steps compare after updates, which carry the kernels' rounding
differences forward (training amplifies them), so they get more room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LossTolerance:
    first: float
    """Relative tolerance at the first step (same weights: the kernels' rounding only)."""
    later: float
    """Relative tolerance at every later step."""
    why: str
    """Where the figures come from, printed with a failure."""


TOLERANCES = {
    "bf16": LossTolerance(5e-3, 2e-2, "bf16 keeps 8 significant bits (rounding 2^-9 = 0.2% per operation); fused "
                                      "and torch kernels round at different points and accumulate in different "
                                      "orders: 0.5% at the first step, 2% once updates have carried the differences"),
    "fp16": LossTolerance(1e-3, 5e-3, "fp16 keeps 11 significant bits (rounding 2^-12 = 0.02% per operation): "
                                      "0.1% at the first step, 0.5% later"),
    "fp32": LossTolerance(1e-5, 1e-4, "fp32: only the order of summation differs"),
}


@dataclass(frozen=True)
class LossComparison:
    steps: int
    worst_step: int
    """1-based step of the largest relative difference."""
    worst_relative: float
    max_abs: float
    ok: bool
    failing_step: int = 0
    """1-based first step over its tolerance (0: none)."""

    def describe(self) -> str:
        verdict = "within tolerance" if self.ok else f"step {self.failing_step} over tolerance"
        return (f"{self.steps} steps: largest difference {self.max_abs:.3e} (relative {self.worst_relative:.2e} at "
                f"step {self.worst_step}); {verdict}")


def compare_losses(ours: Sequence[float], reference: Sequence[float], tolerance: LossTolerance) -> LossComparison:
    """Step-by-step comparison of two loss sequences (ours against the reference). Raises
    ValueError for sequences of different or zero length, or a non-finite loss."""
    if len(ours) != len(reference) or not ours:
        raise ValueError(f"cannot compare {len(ours)} losses with {len(reference)}: the runs must log the same "
                         "steps, at least one")
    for name, seq in (("ours", ours), ("reference", reference)):
        bad = [i + 1 for i, v in enumerate(seq) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{name}: non-finite loss at step {bad[0]}")
    worst_step, worst_rel, max_abs, failing = 1, 0.0, 0.0, 0
    for i, (a, b) in enumerate(zip(ours, reference)):
        diff = abs(a - b)
        rel = diff / abs(b) if b else (0.0 if diff == 0 else math.inf)
        if rel > worst_rel:
            worst_step, worst_rel = i + 1, rel
        max_abs = max(max_abs, diff)
        limit = tolerance.first if i == 0 else tolerance.later
        if rel > limit and not failing:
            failing = i + 1
    return LossComparison(len(ours), worst_step, worst_rel, max_abs, failing == 0, failing)


def check_losses(ours: Sequence[float], reference: Sequence[float], tolerance: LossTolerance,
                 what: str) -> LossComparison:
    """compare_losses, raising AssertionError (one line: what, the figures, the tolerance and
    why) when a step is over its tolerance."""
    result = compare_losses(ours, reference, tolerance)
    if not result.ok:
        raise AssertionError(f"{what}: {result.describe()} (tolerance: relative {tolerance.first:g} at the first "
                             f"step, {tolerance.later:g} later; {tolerance.why}); ours {list(ours)}, reference "
                             f"{list(reference)}")
    return result

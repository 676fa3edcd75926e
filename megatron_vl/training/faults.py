"""Fault injection for the tests of the failure paths (non-finite loss, a save killed
half-way). Off unless MEGATRON_VL_INJECT names a fault, e.g.
``MEGATRON_VL_INJECT="nan_loss@3,4,5"`` or ``"kill_during_save@4"`` (iterations, 1-based)."""

from __future__ import annotations

import os
import signal
from typing import Dict, Set

ENV = "MEGATRON_VL_INJECT"


def _faults() -> Dict[str, Set[int]]:
    spec = os.environ.get(ENV, "")
    out: Dict[str, Set[int]] = {}
    for item in filter(None, spec.split(";")):
        name, _, iters = item.partition("@")
        out[name.strip()] = {int(i) for i in iters.split(",") if i.strip()}
    return out


def nan_loss_at(iteration: int) -> bool:
    return iteration in _faults().get("nan_loss", ())


def maybe_kill_during_save(iteration: int) -> None:
    """SIGKILL this process after its checkpoint files are written but before `latest` moves."""
    if iteration in _faults().get("kill_during_save", ()):
        os.kill(os.getpid(), signal.SIGKILL)

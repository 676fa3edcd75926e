"""Fault injection for the tests of the failure paths (non-finite loss, a save killed
half-way). Off unless MEGATRON_VL_INJECT names a fault, e.g.
``MEGATRON_VL_INJECT="nan_loss@3,4,5"`` or ``"kill_during_save@4"`` (iterations, 1-based;
several faults separated by ``;``). A malformed value is refused at start-up by name."""

from __future__ import annotations

import os
import signal
from typing import Dict, Set

from ..errors import UsageError

ENV = "MEGATRON_VL_INJECT"
FAULTS = ("nan_loss", "kill_during_save")
FORM = "NAME@ITER[,ITER...][;NAME@ITER...] with NAME one of " + ", ".join(FAULTS) + \
    " and ITER a positive iteration number, e.g. nan_loss@3,4"


def _faults() -> Dict[str, Set[int]]:
    spec = os.environ.get(ENV, "")
    out: Dict[str, Set[int]] = {}
    for item in filter(None, (i.strip() for i in spec.split(";"))):
        name, at, iters = item.partition("@")
        name = name.strip()
        try:
            steps = {int(i) for i in iters.split(",") if i.strip()}
        except ValueError:
            steps = set()
        if name not in FAULTS or not at or not steps or min(steps) < 1:
            raise UsageError(f"{ENV}={spec!r}: {item!r} is not a fault; expected {FORM} (a test hook: unset it "
                             "for a normal run)")
        out.setdefault(name, set()).update(steps)
    return out


def check() -> None:
    """Refuses a malformed MEGATRON_VL_INJECT before the run starts."""
    _faults()


def nan_loss_at(iteration: int) -> bool:
    return iteration in _faults().get("nan_loss", ())


def maybe_kill_during_save(iteration: int) -> None:
    """SIGKILL this process after its checkpoint files are written but before `latest` moves."""
    if iteration in _faults().get("kill_during_save", ()):
        os.kill(os.getpid(), signal.SIGKILL)

"""RNG streams for dropout under tensor parallelism.

Dropout on activations that every TP rank holds in full (the residual stream) must draw the
same mask on every TP rank: it uses the default generator, seeded identically across the
TP group. Dropout on activations that are split across ranks (attention probabilities of a
rank's own heads) must draw *different* masks per rank, or the TP model is not the TP=1
model: it runs inside ``tracker.fork()``, a stream seeded per TP rank.
"""

from __future__ import annotations

import contextlib
import random
from typing import Dict

import numpy as np
import torch

MODEL_PARALLEL_STREAM = "model-parallel-rng"
# Offset so the per-rank stream never coincides with the shared default stream.
_MODEL_PARALLEL_SEED_OFFSET = 2718


def _device_get_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _device_set_state(device: str, state: torch.Tensor) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can be swapped in around a block of code."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.states: Dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = _device_get_state(self.device)
        if self.device == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _device_get_state(self.device)
        _device_set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_STREAM):
        if name not in self.states:
            raise KeyError(f"RNG stream {name!r} was never added (call seed_everything first)")
        saved = _device_get_state(self.device)
        _device_set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _device_get_state(self.device)
            _device_set_state(self.device, saved)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def load_state_dict(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def seed_everything(seed: int, tp_rank: int = 0, pp_rank: int = 0, device: str = "cpu") -> RNGStatesTracker:
    """Seeds python, numpy and torch (same on every TP rank of a stage; pipeline stages
    differ so their layers do not share dropout masks) and returns the tracker with the
    per-TP-rank stream."""
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_STREAM, stage_seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    return tracker

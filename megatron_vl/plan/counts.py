"""Parameters per rank, counted on the real model built on the meta device.

A rank's layers are built by the same classes and the same LoRA as in training (no memory,
no processes: ``ParallelState.layout``), so the counts cannot drift from the code. ZeRO-3
then holds each parameter's partition, ceil(n / dp) elements, except the small ones
DeepSpeed keeps whole on every rank (its persistence threshold).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import torch

ZERO3_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default stage3_param_persistence_threshold: parameters up to this many
elements stay whole on every rank under ZeRO-3."""


@dataclass(frozen=True)
class StageParameters:
    """The parameters one TP rank of one pipeline stage builds: (elements, trainable) each."""
    params: Tuple[Tuple[int, bool], ...]

    def total(self, trainable: bool) -> int:
        return sum(n for n, t in self.params if t == trainable)

    def held(self, trainable: bool, zero_stage: int, dp: int,
             persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD) -> int:
        """Elements this rank holds: its TP/PP slice, or under ZeRO-3 its partition."""
        if zero_stage < 3:
            return self.total(trainable)
        return sum(n if n <= persistence_threshold else -(-n // dp) for n, t in self.params if t == trainable)

    @property
    def largest(self) -> int:
        return max(n for n, _ in self.params)


def _model_key(cfg) -> tuple:
    m, lora = cfg.model, cfg.lora
    return (repr(m), lora.lora_rank, lora.lora_alpha, tuple(lora.lora_target_modules))


@functools.lru_cache(maxsize=256)
def _stage(model_key, cfg_holder, tp: int, pp: int, pp_rank: int) -> StageParameters:
    cfg = cfg_holder.cfg
    from ..model.lora import apply_lora
    from ..model.vlgpt import VLGPTModel
    from ..parallel.layers import deferred_initialization
    from ..parallel.layout import RankLayout
    from ..parallel.state import ParallelState
    state = ParallelState.layout(tp, pp, 1, rank=RankLayout.of(tp=tp, pp=pp).rank(pp=pp_rank))
    with torch.device("meta"), deferred_initialization():
        module = VLGPTModel(cfg.model, state)
        if cfg.lora.lora_rank > 0:
            v = cfg.model.vocab_size
            apply_lora(module, cfg.lora, [v - 2, v - 1], 0, lambda name: name)
    return StageParameters(tuple((p.numel(), p.requires_grad) for p in module.parameters()))


class _Holder:
    """Carries the config into the cache without hashing it (the key is _model_key)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Holder)


def stage_parameters(cfg, tp: int, pp: int, pp_rank: int) -> StageParameters:
    """The parameters of pipeline stage pp_rank on one TP rank (every TP rank builds the same
    shapes), for cfg's model and LoRA settings."""
    return _stage(_model_key(cfg), _Holder(cfg), tp, pp, pp_rank)


def rank_parameters(cfg, tp: int, pp: int, dp: int, zero_stage: int,
                    persistence_threshold: int = ZERO3_PERSISTENCE_THRESHOLD) -> List[dict]:
    """Per pipeline stage: trainable and frozen elements a rank holds, and before ZeRO-3."""
    out = []
    for stage in range(pp):
        params = stage_parameters(cfg, tp, pp, stage)
        out.append({"stage": stage, "last": stage == pp - 1,
                    "trainable": params.held(True, zero_stage, dp, persistence_threshold),
                    "frozen": params.held(False, zero_stage, dp, persistence_threshold),
                    "trainable_slice": params.total(True), "frozen_slice": params.total(False),
                    "largest": params.largest})
    return out

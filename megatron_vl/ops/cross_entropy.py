"""Cross-entropy dispatch: liger's fused kernel on CUDA when the vocabulary is not split
and not padded; the vocab-parallel torch implementation otherwise."""

from __future__ import annotations

from typing import Optional

import torch

from ..parallel.cross_entropy import vocab_parallel_cross_entropy
from ._dispatch import fused_available


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                  vocab_size: Optional[int] = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, impl: str = "auto", inplace: bool = False) -> torch.Tensor:
    """Per-position loss, shape of target (0 where target == ignore_index). inplace: the
    logits buffer may be overwritten (see vocab_parallel_cross_entropy)."""
    unpadded = vocab_size is None or vocab_size == logits.shape[-1]
    if tp_group is None and unpadded and fused_available(logits, impl, "liger_kernel.ops.cross_entropy", "cross_entropy"):
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        flat = LigerCrossEntropyFunction.apply(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), None, ignore_index,
            0.0, label_smoothing, "none")[0]
        return flat.view(target.shape)
    return vocab_parallel_cross_entropy(logits, target, tp_group, vocab_size, ignore_index, label_smoothing,
                                        inplace)

"""Cross-entropy's fused kernel (liger) for a whole, unpadded vocabulary; the vocab-parallel
implementation and the choice between the two live in parallel/cross_entropy.py."""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import fused_available


def fused_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                        label_smoothing: float = 0.0, impl: str = "auto") -> Optional[torch.Tensor]:
    """Per-position loss from liger's kernel (0 where target == ignore_index), or None when
    `impl` and the device leave it to the reference (--fused-kernels require raises instead)."""
    if not fused_available(logits, impl, "liger_kernel.ops.cross_entropy", "cross_entropy"):
        return None
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    flat = LigerCrossEntropyFunction.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), None, ignore_index,
        0.0, label_smoothing, "none")[0]
    return flat.view(target.shape)

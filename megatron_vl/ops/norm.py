"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), computed in fp32 as HF LLaMA does."""

from __future__ import annotations

import torch

from ._dispatch import fused_available


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    in_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(in_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    if fused_available(x, impl, "liger_kernel.ops.rms_norm", "rms_norm"):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        # casting_mode "llama": fp32 statistics, cast back before the weight, as HF.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)
    return rms_norm_reference(x, weight, eps)

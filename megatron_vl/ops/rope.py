"""Rotary position embeddings (HF LLaMA's rotate-half convention), with optional
LLaMA-3.1 frequency scaling."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._dispatch import fused_available


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """Inverse frequencies, float32. scaling: {"type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    if scaling["type"] != "llama3":
        raise ValueError(f"unknown rope scaling {scaling['type']!r}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryFrequencies(torch.nn.Module):
    """The inverse frequencies as a module's buffer that moves with the module but stays fp32
    under any cast: DeepSpeed's engine calls module.bfloat16() / half(), which would round
    them (bf16 keeps 8 bits: the slowest frequencies, and so long-range positions, go wrong)."""

    def __init__(self, head_dim: int, base: float, scaling: Optional[dict] = None):
        super().__init__()
        self._exact = rope_inv_freq(head_dim, base, scaling)
        self.register_buffer("inv_freq", self._exact.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:   # a cast: put the exact values back, on its device
            self.inv_freq = self._exact.to(self.inv_freq.device)
        return self


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype=torch.float32
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """q: [b, s, h, d], k: [b, s, g, d]; cos/sin: [b, s, d]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q, k, cos, sin, impl: str = "auto"):
    if fused_available(q, impl, "liger_kernel.ops.rope", "rope"):
        from liger_kernel.ops.rope import LigerRopeFunction
        # liger works on [b, h, s, d]
        q2, k2 = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q2.transpose(1, 2), k2.transpose(1, 2)
    return apply_rope_reference(q, k, cos, sin)

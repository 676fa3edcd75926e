"""Causal grouped-query attention, optionally confined to documents of a packed sample.

Layout everywhere: q [b, s, heads, d], k/v [b, s, kv_heads, d] -> out [b, s, heads, d].
``segment_ids`` [b, s] (document index per position) restricts attention to positions of
the same document; None is plain causal attention. It may also be a ``Documents``: the same
segment ids with flash-attn's varlen boundaries (``cu_seqlens``, ``max_seqlen``) worked out
once per batch, on the host where the batch is built (``documents_from_segments``), so no
layer stalls the device to compute them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._dispatch import fused_available, record


class Documents(NamedTuple):
    segment_ids: torch.Tensor     # [b, s]
    cu_seqlens: torch.Tensor      # [runs + 1] int32: start of each (sample, document) run in b * s
    max_seqlen: int


def documents_from_segments(segment_ids: torch.Tensor) -> Documents:
    """The varlen boundaries of a [b, s] segment-id batch; on a CPU tensor this costs the
    device nothing (build it beside the batch, then move cu_seqlens with the batch)."""
    b, s = segment_ids.shape
    flat = (segment_ids + torch.arange(b, device=segment_ids.device).unsqueeze(1) * (segment_ids.max() + 1)).reshape(-1)
    starts = torch.nonzero(torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]])).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
    return Documents(segment_ids, cu, int((cu[1:] - cu[:-1]).max()))


SegmentsArg = Union[None, torch.Tensor, Documents]


def _segment_ids(segments: SegmentsArg) -> Optional[torch.Tensor]:
    return segments.segment_ids if isinstance(segments, Documents) else segments


def _segment_mask(segment_ids: torch.Tensor, seq: int) -> torch.Tensor:
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same_doc = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (causal & same_doc).unsqueeze(1)  # [b, 1, s, s]


def attention_reference(q, k, v, segment_ids: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """The textbook computation, in fp32: the semantics every other path must match."""
    segment_ids = _segment_ids(segment_ids)
    b, s, h, d = q.shape
    rep = h // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    mask = _segment_mask(segment_ids, s) if segment_ids is not None else \
        torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def attention_sdpa(q, k, v, segment_ids=None, dropout_p: float = 0.0) -> torch.Tensor:
    segment_ids = _segment_ids(segment_ids)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    if segment_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:
        mask = _segment_mask(segment_ids, q.shape[1])
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return out.transpose(1, 2)


def _attention_flash(q, k, v, segment_ids, dropout_p):
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    if segment_ids is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    # Each (sample, document) run becomes one variable-length sequence. Boundaries computed
    # here (from a bare tensor: pipeline stages) cost two device syncs per layer; a Documents
    # built beside the batch costs none.
    docs = segment_ids if isinstance(segment_ids, Documents) else documents_from_segments(segment_ids)
    b, s = docs.segment_ids.shape
    cu, max_len = docs.cu_seqlens.to(q.device, torch.int32), docs.max_seqlen
    out = flash_attn_varlen_func(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                                 v.reshape(b * s, *v.shape[2:]), cu, cu, max_len, max_len,
                                 dropout_p=dropout_p, causal=True)
    return out.view(b, s, *out.shape[1:])


def attention(q, k, v, segment_ids: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              impl: str = "auto") -> torch.Tensor:
    """Dispatch: flash-attn on CUDA when importable and the dtype is half precision; torch's
    SDPA otherwise (its flash/memory-efficient backends on CUDA, its fused CPU kernel here)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if impl in ("fused", "require") and not half:
        raise RuntimeError(f"fused kernel required for attention, but flash-attn takes fp16/bf16, not {q.dtype}")
    if half and fused_available(q, impl, "flash_attn", "attention",
                                fallback="reference" if impl == "reference" else "torch sdpa"):
        return _attention_flash(q, k, v, segment_ids, dropout_p)
    record("attention", "reference" if impl == "reference" else "torch sdpa")
    if impl == "reference":
        return attention_reference(q, k, v, segment_ids, dropout_p)
    return attention_sdpa(q, k, v, segment_ids, dropout_p)

"""One tensor of a checkpoint, stored as the slices of one tensor-parallel size, cut for a
rank of another: the rule every layout change uses (a release checkpoint loaded at another
TP/PP, a training checkpoint resumed under another layout, a --finetune load at another TP).

A cut reads only the stored slices that hold part of this rank's tensor and copies only this
rank's part: the full tensor is not built (except a vocabulary table that grows, whose new
rows are the mean of all old ones). A reader of a whole checkpoint through `cut_lazily` holds,
beside what it keeps, the stored slices of one tensor at a time.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..config import ModelConfig
from .training_reader import LazyTensors

Rule = Optional[Tuple[object, int]]
"""How TP cuts a tensor, as checkpoint.names.tp_split gives it: None (whole on every rank),
("vocab", 0) (padded vocabulary rows), or (fused part sizes or None for one part, dim)."""


def _stretches(parts: Sequence[int], old: int, tp: int, tp_rank: int) -> List[Tuple[int, int, int]]:
    """(old rank, start in its slice, length) of each stretch along the split dim that this
    rank's slice is made of, in order: each part is cut in `old` pieces on disk and in `tp`
    pieces now; this rank takes piece tp_rank of every part."""
    out, before = [], 0
    for p in parts:
        for world in (old, tp):
            if p % world:
                raise ValueError(f"size {p} of a split dimension is not divisible by {world} ranks")
        stored, wanted = p // old, p // tp
        a, b = tp_rank * wanted, (tp_rank + 1) * wanted
        for r in range(a // stored, (b - 1) // stored + 1):
            s, e = max(a, r * stored), min(b, (r + 1) * stored)
            out.append((r, before + s - r * stored, e - s))
        before += stored
    return out


def _copy_stretches(slices, stretches, dim: int, read: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
    read = dict(read or {})   # each old slice is read once, and only when a stretch needs it
    pieces = []
    for r, start, n in stretches:
        if r not in read:
            read[r] = slices[r]
        pieces.append(read[r].narrow(dim, start, n))
    return torch.cat(pieces, dim=dim)   # a copy: the stored slices are freed when this returns


def _vocab_rows(slices, model: ModelConfig, tp: int, tp_rank: int, rows_then: Optional[int],
                padded_then: Optional[int]) -> torch.Tensor:
    rows, padded = model.vocab_size, model.padded_vocab_size(tp)
    kept = rows if rows_then is None else rows_then
    local = padded // tp
    a, b = tp_rank * local, (tp_rank + 1) * local
    if kept < rows:   # a table grows: the new rows start at the mean of all the old ones
        full = torch.cat([slices[r] for r in range(len(slices))])[:kept]
        mean = full.float().mean(0, keepdim=True).to(full.dtype)
        out = full.new_zeros((local,) + tuple(full.shape[1:]))
        if a < kept:
            out[:min(b, kept) - a] = full[a:min(b, kept)]
        if max(a, kept) < min(b, rows):
            out[max(a, kept) - a:min(b, rows) - a] = mean
        return out
    read = {} if padded_then is not None else {0: slices[0]}
    stored = padded_then // len(slices) if padded_then is not None else read[0].shape[0]
    end = min(b, kept)
    stretches = [(r, max(a, r * stored) - r * stored, min(end, (r + 1) * stored) - max(a, r * stored))
                 for r in range(len(slices)) if max(a, r * stored) < min(end, (r + 1) * stored)]
    # this rank's real rows, then padding rows: never predicted, their number depends on the
    # TP size, zero whatever was stored
    real = _copy_stretches(slices, stretches, 0, read) if stretches else slices[0][:0]
    return torch.cat([real, real.new_zeros((local - real.shape[0],) + tuple(real.shape[1:]))])


def cut_for_rank(rule: Rule, slices: Sequence[torch.Tensor], model: ModelConfig, tp: int, tp_rank: int,
                 rows_then: Optional[int] = None, padded_then: Optional[int] = None) -> torch.Tensor:
    """This TP rank's tensor (of a run of `model` at TP size tp) from the slices the old TP
    ranks stored, in rank order. `slices` may be lazy (each indexing reads): only the old
    slices that hold part of this rank's tensor are indexed, each once. rows_then /
    padded_then: the real and padded rows of the stored vocabulary tables (default: the
    model's vocabulary; padded rows from the first slice); a table with fewer real rows than
    the model grows."""
    if rule is None:
        return slices[0]
    parts, dim = rule
    if parts == "vocab":
        return _vocab_rows(slices, model, tp, tp_rank, rows_then, padded_then)
    read = {}
    if parts is None:   # one part: its size from a stored slice
        read[0] = slices[0]
        parts = [read[0].shape[dim] * len(slices)]
    return _copy_stretches(slices, _stretches(list(parts), len(slices), tp, tp_rank), dim, read)


class _StoredSlices(Sequence):
    """The old TP ranks' slices of one tensor; indexing reads one from its source."""

    def __init__(self, sources: Sequence[Mapping], name: str):
        self.sources, self.name = sources, name

    def __getitem__(self, r):
        return self.sources[r][self.name]

    def __len__(self) -> int:
        return len(self.sources)


def cut_lazily(sources: Sequence[Mapping], rules: Mapping[str, Rule], model: ModelConfig, tp: int, tp_rank: int,
               rows_then: Optional[int] = None, padded_then: Optional[int] = None) -> LazyTensors:
    """name -> this TP rank's tensor of each name in `rules`, cut (cut_for_rank) when asked
    for from `sources` (name -> stored slice, one mapping per old TP rank, rank order)."""
    def cut(name):
        return cut_for_rank(rules[name], _StoredSlices(sources, name), model, tp, tp_rank, rows_then, padded_then)
    return LazyTensors({name: functools.partial(cut, name) for name in rules})

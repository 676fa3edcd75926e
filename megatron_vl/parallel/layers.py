"""Megatron-style tensor-parallel layers.

A column-parallel weight can be *fused*: several logical projections (q, k, v; or gate, up)
stored as one matrix. Each logical part is split across ranks on its own, so a rank's
local weight is [part0 slice; part1 slice; ...] and a rank's q heads line up with its k/v
heads. ``shard_parts`` / ``unshard_parts`` are the one definition of that layout, used by
the layers' initialisation and by checkpoint conversion alike.
"""

from __future__ import annotations

import contextlib
import threading

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import copy_to_group, gather_from_group, group_rank, group_size, reduce_from_group, scatter_to_group

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def normal_init(std: float) -> InitMethod:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def shard_parts(full: torch.Tensor, parts: Sequence[int], rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """This rank's slice of a (possibly fused) tensor: each part split in `world` along dim."""
    pieces = []
    for part in full.split(list(parts), dim=dim):
        if part.shape[dim] % world:
            raise ValueError(f"size {part.shape[dim]} of dim {dim} is not divisible by {world} ranks")
        pieces.append(part.chunk(world, dim=dim)[rank])
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_parts(shards: Sequence[torch.Tensor], parts: Sequence[int], dim: int = 0) -> torch.Tensor:
    """Inverse of shard_parts: the full tensor from every rank's slice (rank order)."""
    world = len(shards)
    local = [p // world for p in parts]
    split = [s.split(local, dim=dim) for s in shards]
    return torch.cat([torch.cat([split[r][i] for r in range(world)], dim=dim)
                      for i in range(len(parts))], dim=dim).contiguous()


def _mark_parallel(param: nn.Parameter, dim: int) -> None:
    # DeepSpeed's norm/clipping code reads this attribute to count each shard once.
    param.tensor_model_parallel = True
    param.partition_dim = dim


_deferred = threading.local()


@contextlib.contextmanager
def deferred_initialization():
    """Layers built inside leave their weights uninitialised (torch.empty of this rank's
    slice only): the caller writes every weight afterwards (training/build.py), so neither
    the full tensors nor the random draws of the constructors are spent."""
    previous = getattr(_deferred, "on", False)
    _deferred.on = True
    try:
        yield
    finally:
        _deferred.on = previous


def _init_sharded(local: torch.Tensor, full_shape, parts, rank, world, dim, init_method) -> None:
    """Initialises the full weight and keeps this rank's slice, so a TP=N model starts from
    exactly the weights of the TP=1 model with the same seed."""
    if getattr(_deferred, "on", False) or local.is_meta:
        return
    full = torch.empty(full_shape, dtype=torch.float32)
    init_method(full)
    with torch.no_grad():
        local.copy_(shard_parts(full, parts, rank, world, dim))


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A's output rows split across the TP group. ``output_sizes`` lists the
    logical parts of a fused projection (default: one part)."""

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = False,
                 gather_output: bool = False, output_sizes: Optional[List[int]] = None,
                 init_method: InitMethod = normal_init(0.02), dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.gather_output = gather_output
        world, rank = group_size(tp_group), group_rank(tp_group)
        self.output_sizes = list(output_sizes or [output_size])
        if sum(self.output_sizes) != output_size:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to {output_size}")
        self.local_output_sizes = [s // world for s in self.output_sizes]
        self.weight = nn.Parameter(torch.empty(output_size // world, input_size, dtype=dtype))
        _init_sharded(self.weight, (output_size, input_size), self.output_sizes, rank, world, 0, init_method)
        _mark_parallel(self.weight, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size // world, dtype=dtype))
            _mark_parallel(self.bias, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_group(x, self.tp_group), self.weight, self.bias)
        return gather_from_group(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T with A's input columns split across the TP group; partial products are
    summed over the group, then the (replicated) bias is added."""

    def __init__(self, input_size: int, output_size: int, *, tp_group=None, bias: bool = False,
                 input_is_parallel: bool = True, init_method: InitMethod = normal_init(0.02),
                 dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        world, rank = group_size(tp_group), group_rank(tp_group)
        self.weight = nn.Parameter(torch.empty(output_size, input_size // world, dtype=dtype))
        _init_sharded(self.weight, (output_size, input_size), [input_size], rank, world, 1, init_method)
        _mark_parallel(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.tp_group)
        y = reduce_from_group(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across the TP group: each rank looks up the
    ids in its range, zeros the rest, and the group sums the results."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None,
                 init_method: InitMethod = normal_init(0.02), dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        world, rank = group_size(tp_group), group_rank(tp_group)
        if num_embeddings % world:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by {world} TP ranks")
        self.num_embeddings = num_embeddings
        self.per_rank = num_embeddings // world
        self.vocab_start = rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype))
        _init_sharded(self.weight, (num_embeddings, embedding_dim), [num_embeddings], rank, world, 0, init_method)
        _mark_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.tp_group)


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "shard_parts", "unshard_parts", "normal_init"]

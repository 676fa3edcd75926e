"""Autograd-aware collectives over a tensor-parallel group. ``group=None`` (a size-1 axis)
makes each of them the identity, forward and backward."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class LayoutGroup:
    """A group's size and this rank's place in it, without processes: enough to build a
    rank's layers (on the meta device, to count or plan), never to communicate."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank


def group_size(group) -> int:
    if isinstance(group, LayoutGroup):
        return group.size
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    if isinstance(group, LayoutGroup):
        return group.rank
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce, no autograd; returns x. Over a LayoutGroup only meta tensors
    pass (shapes only: a rank's layer run on the meta device to plan its memory)."""
    if isinstance(group, LayoutGroup):
        if not x.is_meta:
            raise RuntimeError("a LayoutGroup has no processes: only meta tensors pass its all-reduce")
        return x
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToGroup(torch.autograd.Function):
    """Forward identity; backward sums the gradient over the group (the input feeds every
    rank's shard of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward sums partial results over the group; backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    """Forward keeps this rank's slice of the last dim; backward gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromGroup(torch.autograd.Function):
    """Forward concatenates every rank's last-dim slice; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _ReduceFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _ScatterToGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    return x if group is None else _GatherFromGroup.apply(x, group)

"""Building a model so that no rank materialises more than its share.

TP/PP: the layers allocate only this rank's slice, uninitialised (``deferred_initialization``)
and the builder writes every weight once. ZeRO-3: the model is built inside
``deepspeed.zero.Init``, which partitions each module's parameters over the data-parallel
group as soon as the module exists, so at most one module's slice is whole at a time; the
builder then writes each weight straight into the rank's partition (``assign``), from one
full tensor at a time, without any collective.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..config import deepspeed_config, effective_zero_stage
from ..parallel.layers import deferred_initialization


def full_shape(p: nn.Parameter) -> torch.Size:
    """A parameter's shape on this TP rank, also when ZeRO-3 has partitioned it away."""
    return getattr(p, "ds_shape", p.shape)


def is_partitioned(p: nn.Parameter) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def assign(p: nn.Parameter, value: torch.Tensor) -> None:
    """Writes value (the parameter's whole TP-rank tensor) into p: into this rank's ZeRO-3
    partition (DeepSpeed's layout: the flattened tensor padded to a multiple of the group
    size, rank r holding elements [r*n, (r+1)*n)), and into the full data of a parameter
    DeepSpeed keeps whole on every rank (below its persistence threshold)."""
    with torch.no_grad():
        if not is_partitioned(p):
            p.copy_(value)
            return
        flat = value.reshape(-1).to(p.ds_tensor.dtype)
        n = p.ds_tensor.numel()
        start = n * dist.get_rank(group=p.ds_process_group)
        mine = flat[start:start + n]
        p.ds_tensor.zero_()
        p.ds_tensor.view(-1)[:mine.numel()].copy_(mine)
        if p.data.numel() == flat.numel():   # persistent: kept whole too
            p.data.copy_(value.view_as(p.data))


def read_whole(p: nn.Parameter) -> torch.Tensor:
    """p's whole TP-rank tensor (gathered when partitioned: collective over its group)."""
    if not is_partitioned(p):
        return p.detach().clone()
    import deepspeed
    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


@contextlib.contextmanager
def construction(cfg, state, world_size: int, pipeline: bool):
    """The context a run's model is built in: deferred initialisation always, and ZeRO-3's
    partitioning at construction when the run uses ZeRO-3."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(deferred_initialization())
        if effective_zero_stage(cfg) == 3 and not pipeline:
            import deepspeed
            # zero.Init reads ranks through deepspeed.comm, which must wrap our process group.
            deepspeed.init_distributed(dist_init_required=False)
            stack.enter_context(deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size),
                                                    mpu=state.as_mpu() if dist.is_initialized() else None))
        yield

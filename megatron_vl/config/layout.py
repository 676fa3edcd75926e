"""The batch split and ZeRO stage a config implies at a world size (any entry point's config
with parallel and training sections)."""

from __future__ import annotations


def data_parallel_size(cfg, world_size: int) -> int:
    tp, pp = cfg.parallel.model_parallel()
    return world_size // (tp * pp)


def gradient_accumulation_steps(cfg, world_size: int) -> int:
    t = cfg.training
    dp = data_parallel_size(cfg, world_size)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    return gbs // (t.micro_batch_size * dp)


def effective_zero_stage(cfg) -> int:
    """The ZeRO stage a run uses: pipelines run ZeRO-1 even when 0 is asked for (DeepSpeed's
    pipeline engine computes the clip norm wrongly at ZeRO-0 and fails to load bf16
    checkpoints there)."""
    p = cfg.parallel
    return 1 if p.model_parallel()[1] > 1 and p.zero_stage == 0 else p.zero_stage

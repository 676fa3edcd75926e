"""AdamW with Megatron's parameter groups and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch
from torch import nn

from ..config import OptimizerConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases and other vectors get no weight decay (Megatron's rule)."""
    return param.dim() < 2 or name.endswith(".bias") or "norm" in name


def parameter_groups(named: Iterable[Tuple[str, nn.Parameter]], weight_decay: float) -> List[dict]:
    """Only trainable parameters reach the optimizer; empty groups are left out."""
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class AdamW(torch.optim.AdamW):
    """torch AdamW that can drop one step. ZeRO >= 1 skips non-finite updates itself; under
    ZeRO-0 DeepSpeed calls this optimizer directly, so the loop sets skip_next instead."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, zero_stage: int) -> torch.optim.AdamW:
    groups = parameter_groups(model.named_parameters(), cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    # ZeRO accepts only the optimizer classes it knows (a subclass is "untested").
    cls = AdamW if zero_stage == 0 else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_at(step: int, cfg: OptimizerConfig, train_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to --lr, then cosine
    / linear decay to --min-lr over --lr-decay-iters (default: --train-iters), then flat."""
    warmup = cfg.lr_warmup_iters
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or train_iters
    span = max(decay_iters - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, train_iters: int):
    """A LambdaLR (DeepSpeed steps it only after applied updates and checkpoints it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, train_iters) / cfg.lr)

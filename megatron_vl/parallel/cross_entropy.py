"""Cross-entropy over logits whose vocabulary is split across the tensor-parallel group.

Numerically stable for large logits (the group-wide max is subtracted first), honours
``ignore_index`` (those positions get loss 0 and no gradient), supports label smoothing (off
by default) and excludes padded vocabulary entries (ids >= ``vocab_size``) from the softmax,
so padding is never predicted. The softmax is kept from forward and turned into the
gradient in place in backward: no second vocabulary-sized buffer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .mappings import all_reduce, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing, inplace):
        local_vocab = logits.shape[-1]
        vocab_start = group_rank(group) * local_vocab
        valid_local = max(0, min(local_vocab, vocab_size - vocab_start))

        shifted = logits.float()
        if shifted is logits and not inplace:
            shifted = shifted.clone()
        if valid_local < local_vocab:
            shifted[..., valid_local:] = float("-inf")
        row_max = shifted.amax(dim=-1)
        all_reduce(row_max, group, dist.ReduceOp.MAX)
        shifted.sub_(row_max.unsqueeze(-1))

        ignored = target == ignore_index
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= local_vocab) | ignored
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = all_reduce(target_logit.masked_fill(outside, 0.0), group)

        if label_smoothing > 0:
            logit_sum = all_reduce(shifted[..., :valid_local].sum(dim=-1), group)
        exp = shifted.exp_()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit
        if label_smoothing > 0:
            mean_log_prob = logit_sum / vocab_size - log_sum_exp
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.label_smoothing = label_smoothing
        ctx.valid_local = valid_local
        ctx.vocab_size = vocab_size
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax  # ctx is used once: its buffer becomes the gradient
        eps = ctx.label_smoothing
        hit = (~outside).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        if eps > 0:
            grad[..., :ctx.valid_local] -= eps / ctx.vocab_size
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """Per-position loss, shape of `target`. logits: [..., local_vocab] (this rank's slice of
    the padded vocabulary); vocab_size: the real vocabulary (default: no padding).
    inplace=True reuses the logits' memory for the softmax (the caller's logits tensor is
    overwritten): pass it when nothing else reads the logits, as the LM head's loss path
    does; copying a [tokens, vocab] buffer costs as much as the softmax itself."""
    world = 1 if group is None else dist.get_world_size(group)
    if vocab_size is None:
        vocab_size = logits.shape[-1] * world
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index, label_smoothing,
                                            inplace)

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

from .. import ops
from .mappings import all_reduce, group_rank


def _softmax_loss_(logits, target, group, vocab_size, ignore_index, label_smoothing):
    """Per-position loss; turns `logits` (float32, this rank's vocabulary slice) into the
    softmax in place. Returns (loss, what _softmax_to_grad_ needs besides the softmax)."""
    local_vocab = logits.shape[-1]
    vocab_start = group_rank(group) * local_vocab
    valid_local = max(0, min(local_vocab, vocab_size - vocab_start))
    if valid_local < local_vocab:
        logits[..., valid_local:] = float("-inf")
    row_max = logits.amax(dim=-1)
    all_reduce(row_max, group, dist.ReduceOp.MAX)
    logits.sub_(row_max.unsqueeze(-1))

    ignored = target == ignore_index
    local_target = target - vocab_start
    outside = (local_target < 0) | (local_target >= local_vocab) | ignored
    local_target = local_target.masked_fill(outside, 0)
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = all_reduce(target_logit.masked_fill(outside, 0.0), group)

    if label_smoothing > 0:
        logit_sum = all_reduce(logits[..., :valid_local].sum(dim=-1), group)
    exp = logits.exp_()
    sum_exp = all_reduce(exp.sum(dim=-1), group)
    log_sum_exp = sum_exp.log()
    loss = log_sum_exp - target_logit
    if label_smoothing > 0:
        mean_log_prob = logit_sum / vocab_size - log_sum_exp
        loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob
    exp.div_(sum_exp.unsqueeze(-1))
    return loss.masked_fill(ignored, 0.0), (local_target, outside, ignored, valid_local)


def _softmax_to_grad_(softmax, local_target, outside, ignored, row_scale, valid_local, vocab_size,
                      label_smoothing):
    """d loss_i / d logits, scaled per row by row_scale, written over the softmax."""
    hit = (~outside).to(softmax.dtype) * (1.0 - label_smoothing)
    softmax.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
    if label_smoothing > 0:
        softmax[..., :valid_local] -= label_smoothing / vocab_size  # padding stays out
    return softmax.mul_(row_scale.masked_fill(ignored, 0.0).unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing, inplace):
        work = logits.float()
        if work is logits and not inplace:
            work = work.clone()
        loss, (local_target, outside, ignored, valid_local) = _softmax_loss_(
            work, target, group, vocab_size, ignore_index, label_smoothing)
        ctx.save_for_backward(work, local_target, outside, ignored)
        ctx.args = (valid_local, vocab_size, label_smoothing, logits.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        valid_local, vocab_size, label_smoothing, in_dtype = ctx.args
        grad = _softmax_to_grad_(softmax, local_target, outside, ignored, grad_loss, valid_local, vocab_size,
                                 label_smoothing)
        return grad.to(in_dtype), None, None, None, None, None, None


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


class _FusedLMHeadLoss(torch.autograd.Function):
    """sum_i w_i * CE(h_i W^T, y_i), computed over token chunks: the [tokens, vocab] logits
    never exist in full, and each chunk's gradients (w.r.t. h and W) are formed in forward
    while its softmax is at hand. backward only scales them by the incoming scalar.

    The weight gradient is summed over chunks in fp32 (a bf16 running sum loses the small
    chunks' parts once it has grown: with 1000 chunks its error is many times bf16's
    rounding), and only for what requires a gradient: a frozen head gets none at all.

    `row_delta` [k, h] is added to the head's rows `rows` (a frozen head whose rows for new
    tokens train, model/lora.py): their logits gain h · delta^T and the delta gets its own small
    gradient, so the head is never copied to form an effective weight, nor given a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, row_delta, rows, target, loss_weights, group, vocab_size, ignore_index,
                chunk_size):
        n = hidden.shape[0]
        grad_delta = torch.zeros(row_delta.shape, dtype=torch.float32, device=row_delta.device) \
            if row_delta is not None and row_delta.requires_grad else None
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        # Each chunk's weight-gradient product in the training dtype (fast matmul), added into
        # the fp32 sum; reused, like the logits buffer, so no fresh pages per chunk.
        product = weight.new_empty(weight.shape) if grad_weight is not None and weight.dtype != torch.float32 \
            else None
        losses = hidden.new_empty(n, dtype=torch.float32)
        buf = hidden.new_empty(min(chunk_size, n), weight.shape[0])
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            logits = torch.mm(h, weight.t(), out=buf[:end - start])
            if row_delta is not None:
                logits.index_add_(1, rows, torch.mm(h, row_delta.t()))
            logits = logits.float()
            loss, state = _softmax_loss_(logits, target[start:end], group, vocab_size, ignore_index, 0.0)
            losses[start:end] = loss
            if grad_hidden is None and grad_weight is None and grad_delta is None:
                continue
            local_target, outside, ignored, valid_local = state
            g = _softmax_to_grad_(logits, local_target, outside, ignored, loss_weights[start:end].float(),
                                  valid_local, vocab_size, 0.0).to(hidden.dtype)
            g_rows = g.index_select(1, rows) if row_delta is not None else None
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[start:end])
                if g_rows is not None:
                    grad_hidden[start:end].addmm_(g_rows, row_delta)
            if grad_delta is not None:
                grad_delta.add_(torch.mm(g_rows.t(), h).float())
            if product is not None:
                grad_weight.add_(torch.mm(g.t(), h, out=product))
            elif grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
        if grad_hidden is not None:
            # Every TP rank holds all of h but only its vocabulary slice: sum their parts.
            all_reduce(grad_hidden, group)
        if product is not None:   # the one cast, into the product buffer: no third head-sized tensor
            grad_weight = product.copy_(grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight,
                              None if grad_delta is None else grad_delta.to(row_delta.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * loss_weights.float()).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_hidden, grad_weight, grad_delta = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total for g in (grad_hidden, grad_weight, grad_delta)]
        return (*scaled, None, None, None, None, None, None, None)


def fused_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                       loss_weights: torch.Tensor, group=None, vocab_size: Optional[int] = None,
                       ignore_index: int = -100, chunk_size: int = 1024, rows=None):
    """Weighted cross-entropy of the LM head without materialising all logits.

    hidden [..., h] (replicated over the TP group), weight [local_vocab, h] (this rank's
    vocabulary slice), target and loss_weights shaped like hidden[..., 0]. Returns
    (sum_i w_i * loss_i, per-position losses detached). Typical weights: 1/num_targets.
    rows: (local row indices, delta [k, h]) trained on top of a frozen weight, or None."""
    from ..ops._dispatch import record   # here: ops imports this module
    record("cross_entropy", "chunked LM-head loss (torch)")
    world = 1 if group is None else dist.get_world_size(group)
    if vocab_size is None:
        vocab_size = weight.shape[0] * world
    h = hidden.reshape(-1, hidden.shape[-1])
    index, delta = rows if rows is not None else (None, None)
    total, losses = _FusedLMHeadLoss.apply(h, weight, delta, index, target.reshape(-1), loss_weights.reshape(-1),
                                           group, vocab_size, ignore_index, chunk_size)
    return total, losses.view(target.shape)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                  vocab_size: Optional[int] = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, impl: str = "auto", inplace: bool = False) -> torch.Tensor:
    """Per-position loss, shape of target (0 where target == ignore_index): liger's fused
    kernel on CUDA when the vocabulary is neither split nor padded, the vocab-parallel
    implementation otherwise. inplace: the logits buffer may be overwritten (see
    vocab_parallel_cross_entropy)."""
    if tp_group is None and (vocab_size is None or vocab_size == logits.shape[-1]):
        fused = ops.fused_cross_entropy(logits, target, ignore_index, label_smoothing, impl)
        if fused is not None:
            return fused
    return vocab_parallel_cross_entropy(logits, target, tp_group, vocab_size, ignore_index, label_smoothing,
                                        inplace)

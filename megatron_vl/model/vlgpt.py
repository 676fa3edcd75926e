"""VL-GPT (architecture only): the LLaMA decoder reading and writing interleaved image-text.

Text positions are embedded by the LLaMA token embedding; visual positions take the stored
image-tokenizer embedding (width d) through a linear visual projection (d -> hidden). On
the way out, beside the LM head, a regression head (hidden -> d) predicts visual embeddings.

The one rule for targets (see data/packing.py): the output at position t predicts element
t+1 — cross-entropy when it is a text token, MSE against its stored embedding when it is a
visual position. Loss = mean CE over text targets + visual_loss_weight x mean MSE over
visual targets (each MSE is averaged over the d features of its position).

As with ``LlamaModel``, the stage pieces (``VLGPTEmbedding``, the decoder layers,
``VLGPTHead``) are separate modules so pipeline stages are built from the same classes
(training/pipeline_stages.py); ``VLGPTModel`` strings together what one stage holds.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..parallel.cross_entropy import fused_lm_head_loss
from ..parallel.random import RNGStatesTracker
from ..parallel.state import ParallelState
from .llama import LlamaEmbedding, LlamaHead, LlamaModel


class VLGPTLoss(NamedTuple):
    """total = lm + visual_loss_weight * visual; lm and visual are detached, for reporting."""
    total: torch.Tensor
    lm: torch.Tensor
    visual: torch.Tensor


def visual_inputs(features: torch.Tensor, visual_slot: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """[b, S, d] visual embedding at each visual position (zeros elsewhere) from a batch's
    features [b, max_images, N, d] and the slot/index of each position (-1 off-image)."""
    b = features.shape[0]
    mask = visual_slot >= 0
    rows = torch.arange(b, device=features.device).unsqueeze(1).expand_as(visual_slot)
    picked = features[rows, visual_slot.clamp(min=0), visual_index.clamp(min=0)]
    return picked.float() * mask.unsqueeze(-1)


def regression_targets(visual_embeds: torch.Tensor) -> torch.Tensor:
    """Target at t is the embedding at t+1 (the last position's target, if any, is never
    visual: a sample never ends inside an image block)."""
    return torch.cat([visual_embeds[:, 1:], torch.zeros_like(visual_embeds[:, :1])], dim=1)


class VLGPTEmbedding(nn.Module):
    """Token embedding for text positions, visual projection for visual positions."""

    def __init__(self, cfg: ModelConfig, state: ParallelState):
        super().__init__()
        self.text = LlamaEmbedding(cfg, state)
        self.visual_proj = nn.Linear(cfg.visual_embed_dim, cfg.hidden_size)
        nn.init.normal_(self.visual_proj.weight, std=cfg.init_method_std)
        nn.init.zeros_(self.visual_proj.bias)

    def forward(self, tokens, visual_embeds, visual_mask):
        x = self.text(tokens)
        # Projected everywhere and selected, so every parameter gets a gradient in every
        # step (text-only batches included), which ZeRO's gradient hooks rely on (a ZeRO-3 rank
        # without images: tests/test_zero3_mixed_images.py).
        v = self.visual_proj(visual_embeds.to(x.dtype))
        return torch.where(visual_mask.unsqueeze(-1), v, x)


class VLGPTHead(nn.Module):
    """Final norm, LM head (vocabulary split over TP) and the regression head."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, visual_loss_weight: float = 1.0,
                 tied_embedding: Optional[LlamaEmbedding] = None):
        super().__init__()
        self.lm = LlamaHead(cfg, state, tied_embedding)
        self.regression = nn.Linear(cfg.hidden_size, cfg.visual_embed_dim)
        nn.init.normal_(self.regression.weight, std=cfg.init_method_std)
        nn.init.zeros_(self.regression.bias)
        self.visual_loss_weight = visual_loss_weight

    def forward(self, hidden, labels=None, visual_targets=None, regression_mask=None):
        """With labels, the loss as a plain (total, lm, visual) tuple (see VLGPTLoss);
        without, (this rank's vocabulary slice of the logits, visual predictions [b, S, d])."""
        if labels is not None:
            return tuple(self.loss(hidden, labels, visual_targets, regression_mask))
        normed = self.lm.final_norm(hidden)
        return self.lm.logits(hidden), self.regression(normed)

    def full_logits(self, local_logits):
        return self.lm.full_logits(local_logits)

    def loss(self, hidden, labels, visual_targets, regression_mask) -> VLGPTLoss:
        normed = self.lm.final_norm(hidden)
        text = labels != -100
        # fp32: bf16 weights (8 bits of mantissa) put the sum, and so the loss and its gradient, off by ~0.2%.
        weights = text.float() / text.sum().clamp(min=1)
        head, rows = self.lm.head_weight_and_rows()
        lm, _ = fused_lm_head_loss(normed, head, labels, weights, self.lm.tp_group, self.lm.vocab_size, rows=rows)
        # Also without a visual target (then weighted 0): a rank that skipped the head would leave
        # its ZeRO-3 peers in the head's all-gather (tests/test_zero3_mixed_images.py).
        pred = self.regression(normed).float()
        per_position = (pred - visual_targets.float()).pow(2).mean(-1)
        mask = regression_mask.to(per_position.dtype)
        visual = (per_position * mask).sum() / mask.sum().clamp(min=1)
        lm = lm.float()
        return VLGPTLoss(lm + self.visual_loss_weight * visual, lm.detach(), visual.detach())


class VLGPTModel(LlamaModel):
    """The VL-GPT layers one pipeline stage holds (all of them when pp = 1).

    forward(batch) with the training batch dict (tokens, visual_embeds, visual_mask,
    position_ids, segment_ids, labels, visual_targets, regression_mask): the last stage
    returns the loss as a (total, lm, visual) tuple (VLGPTLoss's fields; a plain tuple so
    DeepSpeed's output hooks see its tensors); without labels, (logits slice, visual
    predictions)."""

    def __init__(self, cfg: ModelConfig, state: Optional[ParallelState] = None,
                 rng_tracker: Optional[RNGStatesTracker] = None, recompute: bool = False,
                 visual_loss_weight: float = 1.0):
        self.visual_loss_weight = visual_loss_weight   # a float: settable before Module.__init__
        super().__init__(cfg, state or ParallelState.single(), rng_tracker, recompute)

    def build_embedding(self, cfg, state):
        return VLGPTEmbedding(cfg, state)

    def token_embedding(self):
        return self.embedding.text

    def build_head(self, cfg, state, tied):
        return VLGPTHead(cfg, state, self.visual_loss_weight, tied)

    def forward(self, batch=None, hidden_states=None, **kwargs):
        batch = dict(batch or {}, **kwargs)
        if self.pre_process:
            x = self.embedding(batch["tokens"], batch["visual_embeds"], batch["visual_mask"])
        else:
            x = hidden_states
        segments = batch.get("segment_ids")
        if segments is not None and batch.get("cu_seqlens") is not None:   # boundaries built beside the batch
            segments = ops.Documents(segments, batch["cu_seqlens"], int(batch["max_seqlen"]))
        x = self.run_layers(x, batch.get("position_ids"), segments)
        if not self.post_process:
            return x
        if batch.get("labels") is None:
            return self.head(x)
        return self.head(x, batch["labels"], batch["visual_targets"], batch["regression_mask"])

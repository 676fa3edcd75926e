"""LLaMA decoder (architecture only) on tensor-parallel layers.

The pieces a pipeline stage is made of are separate modules (``LlamaEmbedding``,
``LlamaDecoderLayer``, ``LlamaHead``) so a DeepSpeed ``PipelineModule`` can be built from the
same classes; ``LlamaModel`` strings together the pieces one pipeline stage holds.
Parallel groups come in through the ``ParallelState`` argument; a single-process state
makes every collective a no-op.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import ModelConfig
from ..parallel.cross_entropy import cross_entropy, fused_lm_head_loss
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, normal_init
from ..parallel.mappings import copy_to_group, gather_from_group
from ..parallel.random import RNGStatesTracker
from ..parallel.state import ParallelState


def _rope_scaling(cfg: ModelConfig) -> Optional[dict]:
    if cfg.rope_scaling_type is None:
        return None
    return {"type": cfg.rope_scaling_type, "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.impl = impl

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, self.impl)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, rng_tracker: Optional[RNGStatesTracker]):
        super().__init__()
        tp = state.tp
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.num_attention_heads // tp
        self.local_kv_heads = cfg.kv_heads // tp
        self.dropout = cfg.attention_dropout
        self.impl = cfg.fused_kernels
        self.rng_tracker = rng_tracker
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        init = normal_init(cfg.init_method_std)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, q_size + 2 * kv_size, tp_group=state.tp_group,
                                        output_sizes=[q_size, kv_size, kv_size], init_method=init)
        self.out = RowParallelLinear(q_size, cfg.hidden_size, tp_group=state.tp_group, init_method=init)

    def forward(self, x, cos, sin, segment_ids=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv.local_output_sizes, dim=-1)
        q = q.view(b, s, self.local_heads, self.head_dim)
        k = k.view(b, s, self.local_kv_heads, self.head_dim)
        v = v.view(b, s, self.local_kv_heads, self.head_dim)
        q, k = ops.apply_rope(q, k, cos, sin, self.impl)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and self.rng_tracker is not None:
            # A rank's heads are its own: their dropout masks must differ across TP ranks.
            with self.rng_tracker.fork():
                out = ops.attention(q, k, v, segment_ids, dropout, self.impl)
        else:
            out = ops.attention(q, k, v, segment_ids, dropout, self.impl)
        return self.out(out.reshape(b, s, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState):
        super().__init__()
        f = cfg.ffn_hidden_size
        init = normal_init(cfg.init_method_std)
        self.impl = cfg.fused_kernels
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * f, tp_group=state.tp_group,
                                            output_sizes=[f, f], init_method=init)
        self.down = RowParallelLinear(f, cfg.hidden_size, tp_group=state.tp_group, init_method=init)

    def forward(self, x):
        return self.down(ops.swiglu(self.gate_up(x), self.impl))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, rng_tracker: Optional[RNGStatesTracker] = None):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, cfg.fused_kernels)
        self.attention = LlamaAttention(cfg, state, rng_tracker)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, cfg.fused_kernels)
        self.mlp = LlamaMLP(cfg, state)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, segment_ids=None):
        x = x + self.hidden_dropout(self.attention(self.input_norm(x), cos, sin, segment_ids))
        return x + self.hidden_dropout(self.mlp(self.post_attention_norm(x)))


class LlamaEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            cfg.padded_vocab_size(state.tp), cfg.hidden_size, tp_group=state.tp_group,
            init_method=normal_init(cfg.init_method_std))

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class LlamaHead(nn.Module):
    """Final norm and LM head; logits stay split over the vocabulary across TP ranks."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, tied_embedding: Optional[LlamaEmbedding] = None):
        super().__init__()
        self.tp_group = state.tp_group
        self.vocab_size = cfg.vocab_size
        self.impl = cfg.fused_kernels
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, cfg.fused_kernels)
        # A plain attribute (not a submodule) so the tied weight is stored once.
        self._tied = [tied_embedding] if tied_embedding is not None else None
        if tied_embedding is None:
            self.output = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size(state.tp),
                                               tp_group=state.tp_group, init_method=normal_init(cfg.init_method_std))

    def logits(self, hidden):
        hidden = self.final_norm(hidden)
        if self._tied is not None:
            return torch.nn.functional.linear(copy_to_group(hidden, self.tp_group), self.output_weight())
        return self.output(hidden)

    def loss(self, local_logits, labels):
        """Per-position cross-entropy; labels == -100 are ignored. Consumes local_logits
        (its buffer becomes the softmax)."""
        return cross_entropy(local_logits, labels, self.tp_group, self.vocab_size, impl=self.impl,
                                 inplace=True)

    def output_weight(self):
        return self._tied[0].word_embeddings.weight if self._tied is not None else self.output.weight

    def head_weight_and_rows(self):
        """The LM head as the fused loss reads it: (weight, rows). rows is (local row indices,
        their trained delta) when a wrapper trains a few rows of a frozen head (it provides
        `weight_and_rows`), else None."""
        if self._tied is None and hasattr(self.output, "weight_and_rows"):
            return self.output.weight_and_rows()
        return self.output_weight(), None

    def fused_loss(self, hidden, labels, loss_weights):
        """(sum_i w_i * CE_i, per-position CE) straight from the hidden states, chunked over
        tokens so the full logits are never stored (see fused_lm_head_loss)."""
        weight, rows = self.head_weight_and_rows()
        return fused_lm_head_loss(self.final_norm(hidden), weight, labels, loss_weights, self.tp_group,
                                  self.vocab_size, rows=rows)

    def full_logits(self, local_logits):
        """Logits over the real vocabulary (padding stripped), gathered from every TP rank."""
        return gather_from_group(local_logits, self.tp_group)[..., :self.vocab_size]


class LlamaModel(nn.Module):
    """The layers one pipeline stage holds (all of them when pp = 1).

    forward(input_ids | hidden_states, position_ids, segment_ids, labels, loss_weights):
    first stage takes token ids, later stages hidden states. The last stage returns this
    rank's vocabulary slice of the logits; with labels, the per-position loss; with labels
    and loss_weights, (sum_i w_i * loss_i, per-position loss) from the chunked fused head,
    which never stores the full logits (the training path).
    """

    def __init__(self, cfg: ModelConfig, state: Optional[ParallelState] = None,
                 rng_tracker: Optional[RNGStatesTracker] = None, recompute: bool = False):
        super().__init__()
        state = state or ParallelState.single()
        if not cfg.untie_embeddings_and_output_weights and state.pp > 1:
            raise ValueError("tied embeddings with pipeline parallelism are not supported: the "
                             "embedding and the LM head would live on different stages")
        if cfg.hidden_dropout > 0 or cfg.attention_dropout > 0:
            if state.tp > 1 and rng_tracker is None:
                raise ValueError("dropout with tensor parallelism needs an rng_tracker (seed_everything)")
        self.cfg = cfg
        self.recompute = recompute
        self.rng_tracker = rng_tracker
        self.pre_process, self.post_process = state.is_first_stage, state.is_last_stage
        self.layer_offset = state.stage_layers(cfg.num_layers).start
        self.embedding = self.build_embedding(cfg, state) if self.pre_process else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, state, rng_tracker)
                                    for _ in state.stage_layers(cfg.num_layers))
        if self.post_process:
            self.head = self.build_head(cfg, state, None if cfg.untie_embeddings_and_output_weights
                                        else self.token_embedding())
        else:
            self.head = None
        self.rotary = ops.RotaryFrequencies(cfg.head_dim, cfg.rotary_base, _rope_scaling(cfg))

    def forward(self, input_ids=None, hidden_states=None, position_ids=None, segment_ids=None, labels=None,
                loss_weights=None):
        x = self.embedding(input_ids) if self.pre_process else hidden_states
        x = self.run_layers(x, position_ids, segment_ids)
        if not self.post_process:
            return x
        if labels is not None and loss_weights is not None:
            return self.head.fused_loss(x, labels, loss_weights)
        logits = self.head.logits(x)
        return logits if labels is None else self.head.loss(logits, labels)

    # The ends of the stack; a multimodal model overrides these (model/vlgpt.py).
    def build_embedding(self, cfg: ModelConfig, state: ParallelState) -> nn.Module:
        return LlamaEmbedding(cfg, state)

    def token_embedding(self) -> LlamaEmbedding:
        return self.embedding

    def build_head(self, cfg: ModelConfig, state: ParallelState, tied: Optional[LlamaEmbedding]) -> nn.Module:
        return LlamaHead(cfg, state, tied)

    def run_layers(self, x, position_ids=None, segment_ids=None):
        """This stage's decoder layers on hidden states x [b, s, h]."""
        b, s = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        cos, sin = ops.rope_cos_sin(position_ids, self.rotary.inv_freq, x.dtype)
        for layer in self.layers:
            if self.recompute and self.training:
                x = checkpoint(layer, x, cos, sin, segment_ids, use_reentrant=False,
                               context_fn=functools.partial(recompute_contexts, self.rng_tracker))
            else:
                x = layer(x, cos, sin, segment_ids)
        return x

    def full_logits(self, local_logits):
        return self.head.full_logits(local_logits)


def recompute_contexts(tracker: Optional[RNGStatesTracker]):
    """torch's checkpoint replays the default RNG; the TP dropout stream lives in our
    tracker, so the recomputation must start from the tracker state the forward saw."""
    saved = tracker.state_dict() if tracker is not None else None

    @contextlib.contextmanager
    def recompute():
        if tracker is None:
            yield
            return
        after_forward = tracker.state_dict()
        tracker.load_state_dict(saved)
        try:
            yield
        finally:
            tracker.load_state_dict(after_forward)
    return contextlib.nullcontext(), recompute()

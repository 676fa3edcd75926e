"""VL-GPT as a DeepSpeed ``PipelineModule``, built from the same layer classes as VLGPTModel.
(Here, beside the engine, not in parallel/: the parallel core knows no model.)

What crosses a stage boundary is one tuple (hidden states, position ids, segment ids): the
grad-carrying float first (DeepSpeed partitions the first tensor across TP ranks), integer
tensors after it. Stage 0 reads (tokens, visual embeddings, visual mask, position ids,
segment ids); the last stage's loss reads the labels tuple (text targets, visual targets,
regression mask). Components of the loss are kept on the head for reporting.
"""

from __future__ import annotations

import functools
from typing import List, Optional

from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import ModelConfig
from ..model.llama import LlamaDecoderLayer, _rope_scaling, recompute_contexts
from ..model.vlgpt import VLGPTEmbedding, VLGPTHead
from ..parallel.random import RNGStatesTracker
from ..parallel.state import ParallelState


class EmbeddingPipe(VLGPTEmbedding):
    def forward(self, inputs):
        tokens, visual_embeds, visual_mask, position_ids, segment_ids = inputs
        return super().forward(tokens, visual_embeds, visual_mask), position_ids, segment_ids


class DecoderLayerPipe(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, state: ParallelState, rng_tracker: Optional[RNGStatesTracker],
                 recompute: bool, document_isolation: bool):
        super().__init__(cfg, state, rng_tracker)
        self.rng_tracker = rng_tracker
        self.recompute = recompute
        self.document_isolation = document_isolation
        self.rotary = ops.RotaryFrequencies(cfg.head_dim, cfg.rotary_base, _rope_scaling(cfg))

    def forward(self, inputs):
        x, position_ids, segment_ids = inputs
        cos, sin = ops.rope_cos_sin(position_ids, self.rotary.inv_freq, x.dtype)
        segments = segment_ids if self.document_isolation else None
        if self.recompute and self.training:
            x = checkpoint(super().forward, x, cos, sin, segments, use_reentrant=False,
                           context_fn=functools.partial(recompute_contexts, self.rng_tracker))
        else:
            x = super().forward(x, cos, sin, segments)
        return x, position_ids, segment_ids


class HeadPipe(VLGPTHead):
    """Forward passes the hidden states through; the loss function (set on the
    PipelineModule) applies the heads, so the fused LM-head loss never stores logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reported: List = []

    def forward(self, inputs):
        return inputs[0]

    def pipeline_loss(self, hidden, labels):
        text_labels, visual_targets, regression_mask = labels
        out = self.loss(hidden, text_labels, visual_targets, regression_mask)
        self.reported.append((out.lm, out.visual))
        return out.total


def build_pipeline_module(cfg: ModelConfig, state: ParallelState, rng_tracker, recompute: bool,
                          document_isolation: bool, visual_loss_weight: float):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    # PipelineModule builds its grid through deepspeed.comm, which must wrap our process group.
    deepspeed.init_distributed(dist_init_required=False)

    if not cfg.untie_embeddings_and_output_weights:
        raise ValueError("tied embeddings with pipeline parallelism are not supported: the embedding and "
                         "the LM head live on different stages")
    specs = [LayerSpec(EmbeddingPipe, cfg, state)]
    specs += [LayerSpec(DecoderLayerPipe, cfg, state, rng_tracker, recompute, document_isolation)
              for _ in range(cfg.num_layers)]
    specs.append(LayerSpec(HeadPipe, cfg, state, visual_loss_weight))
    module = PipelineModule(specs, topology=state.rank_layout.deepspeed_topology(),
                            partition_method="type:DecoderLayerPipe")
    decoder = [i - 1 for i in range(module._local_start, module._local_stop) if 1 <= i <= cfg.num_layers]
    expected = list(state.stage_layers(cfg.num_layers))
    if decoder != expected:
        raise RuntimeError(f"pipeline stage {state.pp_rank} got decoder layers {decoder}, expected {expected}")
    heads = [m for m in module.forward_funcs if isinstance(m, HeadPipe)]
    if heads:
        module.loss_fn = heads[0].pipeline_loss
    return module


def pipeline_inputs(batch) -> tuple:
    """(inputs, labels) tuples of a training batch for the pipeline engine. Every element
    must be a tensor: without document isolation (segment_ids None) the position ids stand in
    for the segment ids, which DecoderLayerPipe then ignores."""
    segments = batch["segment_ids"] if batch["segment_ids"] is not None else batch["position_ids"]
    inputs = (batch["tokens"], batch["visual_embeds"], batch["visual_mask"], batch["position_ids"], segments)
    labels = (batch["labels"], batch["visual_targets"], batch["regression_mask"])
    return inputs, labels


def pipe_head(module) -> Optional[HeadPipe]:
    heads = [m for m in module.modules() if isinstance(m, HeadPipe)]
    return heads[0] if heads else None


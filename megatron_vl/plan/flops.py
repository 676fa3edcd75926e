"""Model FLOPs per token: the one formula behind every MFU the project prints (the planner's
estimate, the GPU acceptance script; training/metrics.py should read it too).

Matmuls. A weight of N elements costs, per token it multiplies: 2N forward (a multiply and an
add each); 2N more for the gradient of its input, needed whenever anything before it trains;
2N more for its own gradient, when it trains. So a trained layer costs 6N, a frozen one that
a gradient passes through (the base under LoRA) 4N, and a trained one whose input is data (the
visual projection: its input is the feature store's embeddings) 4N. N counts the weights the
tokens multiply through: decoder projections, LoRA adapters, LM head, visual projection and
regression head; the embedding lookup is no matmul, and norms and biases are elementwise.
Every vocabulary row multiplies, padding rows included (they are computed).

Attention, per layer and token, a = query heads x head size (grouped K/V heads are shared,
but each query head takes its own dot products): forward QK^T and PV over s keys, 2·s·a each:
4·s·a; backward four products of the same size (dQ, dK, dV, dP): 8·s·a; 12·s·a in all. A
causal mask leaves each query (s+1)/2 keys on average, and the fused kernels skip the masked
blocks, so we count half: 6·s·a per layer, 6·L·s·a per token. (PaLM's appendix B and
Megatron-LM count the full 12·L·s·a; their MFU of a causal model is higher by the
difference.) Document isolation attends less still; not counted, so the figure is what a
whole-sequence causal mask needs. Attention FLOPs need no weights: they are the same with
LoRA, whose backward still passes through every layer.

Recomputation (--recompute-activations) adds a forward (counted as 2N + the attention's
forward: the head, not recomputed, makes it an upper bound): hardware FLOPs, never model FLOPs
(MFU counts the work training needs, not the work a layout chooses to redo).

Tested against torch's FLOP counter on the real layers (tests/test_gpu_acceptance.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class MatmulWeights:
    """Elements of the weights tokens multiply through, by what their backward computes."""
    trainable: int
    """Weights that train (6 FLOPs per element and token)."""
    frozen: int
    """Frozen weights a gradient passes through (4)."""
    data_input: int = 0
    """Of the trainable ones, those whose input is data, so no input gradient (4, not 6)."""

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    seq: int
    width: int
    """Query heads x head size."""
    causal: bool = True


def attention_flops(shape: AttentionShape, backward: bool = True) -> float:
    """Per token: 4·s·a per layer forward, 12·s·a with the backward; half under a causal mask."""
    per_layer = (12 if backward else 4) * shape.seq * shape.width
    return shape.layers * per_layer / (2 if shape.causal else 1)


def training_flops(weights: MatmulWeights, shape: AttentionShape, recompute: bool = False) -> float:
    """Per trained token: 6·trainable + 4·frozen − 2·data_input + attention (+ a forward of
    the layers again with recompute: hardware, not model, FLOPs)."""
    flops = 6 * weights.trainable + 4 * weights.frozen - 2 * weights.data_input + attention_flops(shape)
    if recompute:
        flops += 2 * weights.total + attention_flops(shape, backward=False)
    return flops


def formula(weights: MatmulWeights, shape: AttentionShape) -> str:
    """The per-token formula, then with its numbers, as the acceptance script prints it."""
    k = 12 // (2 if shape.causal else 1)
    if weights.frozen:
        symbols = "4·N_frozen + 6·N_train − 2·N_data"
        numbers = f"4·{weights.frozen:,} + 6·{weights.trainable:,} − 2·{weights.data_input:,}"
    else:
        symbols, numbers = "6·N − 2·N_data", f"6·{weights.trainable:,} − 2·{weights.data_input:,}"
    return (f"{symbols} + {k}·L·s·a = {numbers} + {k}·{shape.layers}·{shape.seq}·{shape.width} = "
            f"{training_flops(weights, shape):,.0f} FLOPs/token")


def attention_shape(model, seq: int = 0) -> AttentionShape:
    """The decoder's attention shape (a ModelConfig), at seq or its seq_length."""
    return AttentionShape(model.num_layers, seq or model.seq_length, model.num_attention_heads * model.head_dim)


def matmul_weights(module) -> MatmulWeights:
    """The matmul weights of a built module (any device, the meta device included), by whether
    they train; the visual projection's are its data-input ones."""
    from torch import nn
    from ..model.llama import LlamaHead
    from ..model.lora import LoraColumnParallelLinear, LoraRowParallelLinear
    from ..model.vlgpt import VLGPTEmbedding
    from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
    trainable = frozen = data = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            weights = [m.weight]
        elif isinstance(m, (LoraColumnParallelLinear, LoraRowParallelLinear)):
            weights = [*m.lora_A.values(), *m.lora_B.values()]
        elif isinstance(m, LlamaHead) and m._tied is not None:
            weights = [m.output_weight()]   # the tied table is the head's matmul
        else:
            weights = []
        for w in weights:
            n = getattr(w, "ds_numel", w.numel())
            if w.requires_grad:
                trainable += n
            else:
                frozen += n
        if isinstance(m, VLGPTEmbedding) and m.visual_proj.weight.requires_grad:
            data += m.visual_proj.weight.numel()
    return MatmulWeights(trainable, frozen, data)


@functools.lru_cache(maxsize=64)
def _model_weights(model_key, holder) -> MatmulWeights:
    import torch
    from ..model.lora import apply_lora
    from ..model.vlgpt import VLGPTModel
    from ..parallel.layers import deferred_initialization
    from ..parallel.state import ParallelState
    cfg = holder.cfg
    with torch.device("meta"), deferred_initialization():
        module = VLGPTModel(cfg.model, ParallelState.single())
        if cfg.lora.lora_rank > 0:
            v = cfg.model.vocab_size
            apply_lora(module, cfg.lora, [v - 2, v - 1], 0, lambda name: name)
    return matmul_weights(module)


def model_weights(cfg) -> MatmulWeights:
    """cfg's whole VL-GPT (TP = PP = 1) built on the meta device by the training classes, LoRA
    applied as training applies it: its matmul weights."""
    from .counts import _Holder, _model_key
    return _model_weights(_model_key(cfg), _Holder(cfg))


def model_flops_per_token(cfg, recompute: bool = False) -> float:
    """Per trained token of cfg's VL-GPT at its seq_length (see the module doc)."""
    return training_flops(model_weights(cfg), attention_shape(cfg.model), recompute)


def weights_from_counts(trainable: int, frozen: int, model, tp: int = 1) -> MatmulWeights:
    """Parameter counts summed over a layout's TP ranks (the planner's: every parameter) as
    matmul weights: less the vocabulary table when it is untied (a lookup; frozen when anything
    is, i.e. under LoRA); norms and biases (under 0.01% of a LLaMA) stay in."""
    table = model.padded_vocab_size(tp) * model.hidden_size if model.untie_embeddings_and_output_weights else 0
    if frozen:
        frozen -= table
    else:
        trainable -= table
    return MatmulWeights(trainable, frozen, model.visual_embed_dim * model.hidden_size)

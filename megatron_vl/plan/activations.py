"""What backward keeps of a micro-batch, measured on the real decoder layer on the meta device.

One TP rank's layer (the training classes, LoRA applied as in training) runs forward on meta
inputs under a saved-tensors hook, which records every storage autograd keeps for backward,
parameters excepted; shapes and dtypes are exact, no memory is used. So the planner's
activation figure follows the code (a LoRA layer keeps less: a frozen weight needs no input
saved for its gradient) instead of a formula written for another architecture. The meta
device takes torch's kernels (SDPA's math path, unfused norm/rope/SwiGLU): a fused GPU kernel
may keep less, which the figure does not know.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=256)
def _layer_saved_bytes(model_key, holder, tp: int, micro: int, seq: int, dtype: torch.dtype,
                       document_mask: bool) -> int:
    from dataclasses import replace
    from .. import ops
    from ..model.llama import LlamaDecoderLayer
    from ..model.lora import apply_lora
    from ..parallel.layers import deferred_initialization
    from ..parallel.state import ParallelState
    cfg = holder.cfg
    model_cfg = replace(cfg.model, fused_kernels="torch")
    state = ParallelState.layout(tp, 1, 1, rank=0)
    with torch.device("meta"), deferred_initialization():
        layer = LlamaDecoderLayer(model_cfg, state).to(dtype)
        if cfg.lora.lora_rank > 0:
            apply_lora(layer, cfg.lora, [], 0, lambda name: name)
            layer.to(dtype)
        x = torch.empty(micro, seq, model_cfg.hidden_size, dtype=dtype, requires_grad=True)
        positions = torch.arange(seq).unsqueeze(0).expand(micro, seq)
        cos, sin = ops.rope_cos_sin(positions, ops.rope_inv_freq(model_cfg.head_dim, model_cfg.rotary_base), dtype)
        segments = torch.zeros(micro, seq, dtype=torch.long) if document_mask else None
    parameters = {p.untyped_storage()._cdata for p in layer.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, segments)
    return sum(saved.values())


def layer_saved_bytes(cfg, tp: int, micro: int, seq: int, dtype: torch.dtype, recompute: bool = False) -> int:
    """Bytes one decoder layer on one TP rank keeps for backward for one micro-batch of
    `micro` sequences of `seq` tokens (with --recompute-activations: its input only)."""
    if recompute:   # checkpointing keeps only the layer's input
        return micro * seq * cfg.model.hidden_size * dtype.itemsize
    from .counts import _Holder, _model_key
    return _layer_saved_bytes(_model_key(cfg), _Holder(cfg), tp, micro, seq, dtype, cfg.data.reset_attention_mask)

"""The weights of a training checkpoint as one plain model: LoRA adapters folded into the
base projections (W += alpha/r · B A) and the trained rows of [IMG]/[/IMG] folded into the
embedding and LM head — per tensor-parallel rank of the checkpoint, in canonical names, no
process group, each tensor merged when asked for (a reader holds one at a time).

What stage 3 (``finetune_instruct.py --finetune --load STAGE2``) starts from: the stage-2
model as trained, on which it puts fresh adapters of its own; at another TP size the
builder cuts these anew (training/reshard.py).
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import torch

from ..model.lora import PARTS
from .layout import CheckpointError
from .names import layer_map
from .training_reader import LazyTensors, Tensors, read_training_checkpoint


# Row-parallel parts split A over TP (B replicated); the others split B (A replicated).
_ROW_PARTS = ("o", "down")
# LoRA part -> our fused projection's path inside a layer (q -> attention.qkv, ...)
_MODULE_OF = {part: (("attention." if attr in ("qkv", "out") else "mlp.") + attr)
              for attr, parts in PARTS.items() for part in parts}
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "visual_embed_dim")


_LAYER_WEIGHT = re.compile(r"layers\.(\d+)\.(attention\.qkv|attention\.out|mlp\.gate_up|mlp\.down)\.weight")
_ROW_DELTAS = {"embedding.word_embeddings.weight": "embedding.rows_delta", "head.output.weight": "head.output.rows_delta"}


class MergedCheckpoint:
    """A stage-2 training checkpoint's weights with its adapters and trained rows folded in,
    for a run of the same architecture (any layout)."""

    def __init__(self, load_dir: str, cfg, iteration: Optional[int] = None):
        w = self.weights = read_training_checkpoint(load_dir, iteration)
        src, m = w.cfg, cfg.model
        differ = [f"--{k.replace('_', '-')} {getattr(src.model, k)} (now {getattr(m, k)})" for k in ARCHITECTURE
                  if getattr(src.model, k) != getattr(m, k)]
        if differ:
            raise CheckpointError(f"{w.path}: written by another architecture: {', '.join(differ)}")
        self.path = w.path
        self.tp = src.parallel.tensor_model_parallel_size
        self.image_token_ids = [int(t) for t in w.client.get("image_token_ids") or []]

    def rank(self, tp_rank: int) -> Tensors:
        """The checkpoint's TP rank tp_rank, merged, by canonical name (lazily)."""
        sd = self.weights.per_tp_rank[tp_rank]
        return LazyTensors({name: functools.partial(self._merged, tp_rank, name) for name in sd
                            if ".lora_" not in name and not name.endswith("rows_delta")})

    def _merged(self, tp_rank: int, name: str) -> torch.Tensor:
        src, tp = self.weights.cfg, self.tp
        sd = self.weights.per_tp_rank[tp_rank]
        out = sd[name].float().clone()
        layer = _LAYER_WEIGHT.fullmatch(name)
        if layer and src.lora.lora_rank:
            scale = src.lora.lora_alpha / src.lora.lora_rank
            key, module = name[:-len(".weight")], layer.group(2)
            parts = PARTS[module.split(".")[1]]
            if parts[0] in _ROW_PARTS:
                if f"{key}.lora_A.{parts[0]}" in sd:
                    out += scale * (sd[f"{key}.lora_B.{parts[0]}"].float() @ sd[f"{key}.lora_A.{parts[0]}"].float())
                return out
            row = 0   # fused column-parallel: each part's rows of this rank, one after another
            for part, size in zip(parts, layer_map(src.model)[f"{module}.weight"][1]):
                rows = size // tp
                if f"{key}.lora_A.{part}" in sd:
                    out[row:row + rows] += scale * (sd[f"{key}.lora_B.{part}"].float() @ sd[f"{key}.lora_A.{part}"].float())
                row += rows
        delta = _ROW_DELTAS.get(name)
        if delta in sd:
            local, start = out.shape[0], out.shape[0] * tp_rank
            for k, t in enumerate(self.image_token_ids):
                if start <= t < start + local:
                    out[t - start] += sd[delta][k].float()
        return out


def merged_rank_weights(load_dir: str, cfg, tp_rank: int, iteration: Optional[int] = None) -> Tensors:
    """The checkpoint's TP rank tp_rank, adapters merged (MergedCheckpoint.rank), for a run at
    the checkpoint's own TP size."""
    merged = MergedCheckpoint(load_dir, cfg, iteration)
    if merged.tp != cfg.parallel.tensor_model_parallel_size:
        raise CheckpointError(f"{merged.path}: written at --tensor-model-parallel-size {merged.tp}, not "
                              f"{cfg.parallel.tensor_model_parallel_size}")
    return merged.rank(tp_rank)

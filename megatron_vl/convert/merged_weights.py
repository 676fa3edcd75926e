"""The weights of a training checkpoint as one plain model: LoRA adapters folded into the
base projections (W += alpha/r · B A) and the trained rows of [IMG]/[/IMG] folded into the
embedding and LM head — per tensor-parallel rank, in canonical names, no process group.

What stage 3 (``finetune_instruct.py --finetune --load STAGE2``) starts from: the stage-2
model as trained, on which it puts fresh adapters of its own.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..model.lora import PARTS
from .hf import CheckpointError, layer_map
from .training_checkpoint import Tensors, read_training_checkpoint

# Row-parallel parts split A over TP (B replicated); the others split B (A replicated).
_ROW_PARTS = ("o", "down")
# LoRA part -> our fused projection's path inside a layer (q -> attention.qkv, ...)
_MODULE_OF = {part: (("attention." if attr in ("qkv", "out") else "mlp.") + attr)
              for attr, parts in PARTS.items() for part in parts}
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "visual_embed_dim")


def merged_rank_weights(load_dir: str, cfg, tp_rank: int, iteration: Optional[int] = None) -> Tensors:
    """This TP rank's weights of the checkpoint in `load_dir`, adapters merged. The run
    reading them must have the checkpoint's architecture and tensor-parallel size."""
    w = read_training_checkpoint(load_dir, iteration)
    src, m = w.cfg, cfg.model
    differ = [f"--{k.replace('_', '-')} {getattr(src.model, k)} (now {getattr(m, k)})" for k in ARCHITECTURE
              if getattr(src.model, k) != getattr(m, k)]
    if differ:
        raise CheckpointError(f"{w.path}: written by another architecture: {', '.join(differ)}")
    tp = src.parallel.tensor_model_parallel_size
    if tp != cfg.parallel.tensor_model_parallel_size:
        raise CheckpointError(f"{w.path}: written at --tensor-model-parallel-size {tp}; start this run at the same "
                              f"size (pipeline stages, data parallelism and ZeRO stage may differ)")
    sd = w.per_tp_rank[tp_rank]
    out: Dict[str, torch.Tensor] = {k: v.float().clone() for k, v in sd.items()
                                     if ".lora_" not in k and not k.endswith("rows_delta")}
    if src.lora.lora_rank:
        scale = src.lora.lora_alpha / src.lora.lora_rank
        sizes = layer_map(src.model)
        for i in range(src.model.num_layers):
            for module in sorted(set(_MODULE_OF.values())):
                key = f"layers.{i}.{module}"
                parts = PARTS[module.split(".")[1]]
                if f"{key}.lora_A.{parts[0]}" not in sd:
                    continue
                weight = out[f"{key}.weight"]
                if parts[0] in _ROW_PARTS:
                    weight += scale * (sd[f"{key}.lora_B.{parts[0]}"].float() @ sd[f"{key}.lora_A.{parts[0]}"].float())
                    continue
                row = 0   # fused column-parallel: each part's rows of this rank, one after another
                for part, size in zip(parts, sizes[f"{module}.weight"][1]):
                    rows = size // tp
                    if f"{key}.lora_A.{part}" in sd:
                        weight[row:row + rows] += scale * (sd[f"{key}.lora_B.{part}"].float()
                                                           @ sd[f"{key}.lora_A.{part}"].float())
                    row += rows
    ids = [int(t) for t in w.client.get("image_token_ids") or []]
    for delta_name, table_name in (("embedding.rows_delta", "embedding.word_embeddings.weight"),
                                   ("head.output.rows_delta", "head.output.weight")):
        if delta_name in sd and table_name in out:
            table = out[table_name]
            local, start = table.shape[0], table.shape[0] * tp_rank
            for k, t in enumerate(ids):
                if start <= t < start + local:
                    table[t - start] += sd[delta_name][k].float()
    return out

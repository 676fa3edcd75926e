"""Layout-independent parameter names and how tensor parallelism cuts each tensor.

Every checkpoint format of ours names parameters the same way: ``embedding.*``,
``layers.<global index>.*``, ``head.*`` — the names of a release checkpoint's shards, whatever
pipeline stage or wrapper (pipeline module, LoRA, the VL-GPT text model) held them in a run.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

from ..config import ModelConfig
from .layout import CheckpointError


# The tensors with a (padded) vocabulary dimension: split over TP by rows, grown for new tokens.
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "head.output.weight")


def canonical_name(name: str, pipeline: bool, layer_offset: int, num_layers: int) -> str:
    """A parameter/module name of this stage -> its layout-independent name: the release
    checkpoint's names (embedding.*, layers.<global i>.*, head.*), wrapper levels removed."""
    if pipeline:
        idx, rest = name.split(".", 1)
        i = int(idx)
        if i == 0:
            name = f"embedding.{rest}"
        elif i <= num_layers:
            name = f"layers.{i - 1}.{rest}"
        else:
            name = f"head.{rest}"
    else:
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m:
            name = f"layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    for wrapper in ("text.", "lm.", "base."):
        name = name.replace(wrapper, "")
    return name


def tp_split(name: str, cfg):
    """(fused part sizes, split dim) of a canonical parameter name under tensor parallelism; "vocab"
    for the padded vocabulary rows; None for a replicated tensor. `cfg` is a run Config."""
    if name in VOCAB_TENSORS:
        return "vocab", 0
    m = re.match(r"layers\.\d+\.(.*)", name)
    if m and m.group(1) in layer_map(cfg.model):
        _, parts, dim = layer_map(cfg.model)[m.group(1)]
        return (parts, dim) if dim is not None else None
    return None


def layer_map(cfg: ModelConfig):
    """our per-layer name -> (HF names, fused part sizes, split dim); None dim = replicated."""
    q, kv, f = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    return {
        "input_norm.weight": (["input_layernorm.weight"], None, None),
        "attention.qkv.weight": (["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"], [q, kv, kv], 0),
        "attention.out.weight": (["self_attn.o_proj.weight"], [q], 1),
        "post_attention_norm.weight": (["post_attention_layernorm.weight"], None, None),
        "mlp.gate_up.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], [f, f], 0),
        "mlp.down.weight": (["mlp.down_proj.weight"], [f], 1),
    }


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> range:
    per = cfg.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def check_layout(cfg: ModelConfig, tp: int, pp: int, name: str = "the model") -> None:
    """Refuses a TP x PP layout the model cannot be cut into, naming every size that does not
    divide (before any tensor is read or written)."""
    problems = []
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tensor-model-parallel-size {tp} / --pipeline-model-parallel-size {pp}: "
                              "must be at least 1")
    for what, size in (("attention heads", cfg.num_attention_heads), ("key/value heads", cfg.kv_heads),
                       ("FFN width (intermediate_size)", cfg.ffn_hidden_size)):
        if size % tp:
            problems.append(f"{what} {size}")
    if cfg.padded_vocab_size(tp) % tp:   # padding makes it divisible; kept as a guard
        problems.append(f"padded vocabulary {cfg.padded_vocab_size(tp)}")
    if problems:
        raise CheckpointError(f"{name} cannot be split over --tensor-model-parallel-size {tp}: "
                              f"{', '.join(problems)} not divisible by {tp}")
    if cfg.num_layers % pp:
        raise CheckpointError(f"{name}: {cfg.num_layers} layers cannot be split into {pp} pipeline stages "
                              "(--pipeline-model-parallel-size)")


def local_to_global(sd: Dict[str, torch.Tensor], layer_offset: int) -> Dict[str, torch.Tensor]:
    """A LlamaModel state dict (stage-local layer indices) -> shard names (global indices)."""
    def rename(k):
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        return f"layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else k
    return {rename(k): v for k, v in sd.items()}


def global_to_local(sd: Dict[str, torch.Tensor], layer_offset: int) -> Dict[str, torch.Tensor]:
    return local_to_global(sd, -layer_offset)

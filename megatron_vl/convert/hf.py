"""Hugging Face LLaMA directories <-> our model: the config.json mapping, reading a
transformers checkpoint's tensors, writing a directory ``LlamaForCausalLM.from_pretrained``
loads. The release checkpoint they are converted to is checkpoint/release.py."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.layout import CheckpointError
from ..checkpoint.output_dir import atomic_directory
from ..checkpoint.release import copy_tokenizer_files
from ..config import ModelConfig


# --- configs ---------------------------------------------------------------------------

def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a LlamaForCausalLM config.json (transformers 4.x or 5.x keys)."""
    name = hf.get("_name_or_path", "config.json")
    if hf.get("model_type") not in ("llama", None):
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{name}: {key}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{name}: hidden_act {hf['hidden_act']!r} is not silu")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{name}: head_dim {hf['head_dim']} != hidden_size / heads")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {**legacy, **rope}
    cfg = ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings"), vocab_size=hf["vocab_size"],
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02))
    cfg.seq_length = min(cfg.seq_length, cfg.max_positions)
    if rope_type == "llama3":
        cfg.rope_scaling_type = "llama3"
        cfg.rope_scaling_factor = float(scaling["factor"])
        cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
        cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
        cfg.rope_original_max_position_embeddings = int(scaling["original_max_position_embeddings"])
    elif rope_type != "default":
        raise CheckpointError(f"{name}: rope type {rope_type!r} is not supported (default, llama3)")
    return cfg


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, extra: Optional[dict] = None) -> dict:
    """config.json for LlamaForCausalLM with the same architecture."""
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling_type == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    out = dict(extra or {})
    out.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base, "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling_type is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "initializer_range": cfg.init_method_std,
        "dtype": str(dtype).replace("torch.", ""),
    })
    return out


# --- files ------------------------------------------------------------------------------

def load_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory: safetensors (single file or
    indexed shards) or pytorch_model*.bin."""
    files = sorted(os.listdir(hf_dir))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if re.fullmatch(r"pytorch_model.*\.bin", f)]
    if not st and not bins:
        raise CheckpointError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weight files")
    sd: Dict[str, torch.Tensor] = {}
    for f in st or bins:
        path = os.path.join(hf_dir, f)
        try:
            part = load_file(path) if st else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read weights: {exc}") from None
        sd.update(part)
    return sd


def save_hf_directory(out_dir: str, hf_sd: Dict[str, torch.Tensor], hf_config: dict,
                      tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30,
                      sources: Tuple[str, ...] = ()) -> None:
    """A directory LlamaForCausalLM.from_pretrained loads: config.json, safetensors (indexed
    shards above max_shard_bytes), tokenizer files. Written to a temporary directory first."""
    with atomic_directory(out_dir, "hf-llama", sources) as tmp:
        write_hf_files(tmp, hf_sd, hf_config, tokenizer_dir, max_shard_bytes)


def write_hf_files(out_dir: str, hf_sd: Dict[str, torch.Tensor], hf_config: dict,
                   tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> None:
    groups, current, size = [], {}, 0
    for name, t in hf_sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    groups.append(current)
    if len(groups) == 1:
        save_file(groups[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(g, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in g})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config, fh, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)

"""Logit parity between a transformers LlamaForCausalLM and our model at any TP size."""

from __future__ import annotations

from typing import Optional

import torch

from ..model.llama import LlamaModel
from ..parallel.state import ParallelState
from ..checkpoint.names import global_to_local
from ..checkpoint.release import hf_to_shards, load_shard_for, read_checkpoint_meta
from .hf import load_hf_state_dict, model_config_from_hf


def load_llama(cfg, state: ParallelState, shard) -> LlamaModel:
    """Our model for this rank with the given shard's weights (strict: every tensor used)."""
    model = LlamaModel(cfg, state)
    model.load_state_dict(global_to_local(shard, model.layer_offset), strict=True)
    return model


def max_logit_difference(hf_dir: str, state: ParallelState, batches: int = 2, batch_size: int = 2,
                         seq_length: int = 64, seed: int = 0, checkpoint: Optional[str] = None) -> float:
    """Max |logits_HF - logits_ours| in fp32 over random token batches (same on every rank).
    With `checkpoint`, our weights come from that converted checkpoint instead of hf_dir."""
    from transformers import LlamaForCausalLM
    if state.pp != 1:
        raise ValueError("parity is checked with pipeline-parallel size 1")
    from ..model.directory import load_pretrained
    if checkpoint:   # a wrong --load is refused before the HF model is read
        read_checkpoint_meta(checkpoint)
    hf_model = load_pretrained(LlamaForCausalLM, hf_dir, "Hugging Face LLaMA (--hf-dir)",
                               torch_dtype=torch.float32).eval()
    if checkpoint:
        cfg, _, _ = read_checkpoint_meta(checkpoint)
        shard = load_shard_for(checkpoint, state.tp, 1, state.tp_rank, 0)
    else:
        cfg = model_config_from_hf(hf_model.config.to_dict())
        shard = hf_to_shards(load_hf_state_dict(hf_dir), cfg, state.tp, 1)[(state.tp_rank, 0)]
    ours = load_llama(cfg, state, {k: v.float() for k, v in shard.items()}).eval()
    seq_length = min(seq_length, cfg.max_positions)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for _ in range(batches):
            ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_length), generator=gen)
            ref = hf_model(ids).logits.float()
            got = ours.full_logits(ours(ids))
            worst = max(worst, (ref - got).abs().max().item())
    return worst

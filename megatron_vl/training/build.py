"""Model construction for a run: the VL-GPT stage (plain module, or a DeepSpeed
PipelineModule when pp > 1), its layout-independent initial weights, the pretrained
weights of a release checkpoint, LoRA, and the DeepSpeed engine around it all."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import Config, deepspeed_config, effective_zero_stage
from ..convert.hf import CheckpointError, hf_to_shards, load_release_shards, read_checkpoint_meta, shards_to_hf
from ..model.lora import apply_lora, parameter_counts
from ..model.vlgpt import VLGPTModel
from ..parallel.pipeline import build_pipeline_module
from ..parallel.state import ParallelState
from .optim import build_optimizer, build_scheduler

VISUAL_PARAMS = ("embedding.visual_proj.weight", "embedding.visual_proj.bias",
                 "head.regression.weight", "head.regression.bias")


@dataclass
class BuiltModel:
    module: nn.Module
    pipeline: bool
    counts: Dict[str, int]
    loaded_from: Optional[str] = None


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


def _names(module: nn.Module, pipeline: bool, offset: int, num_layers: int) -> Dict[str, str]:
    return {n: canonical_name(n, pipeline, offset, num_layers) for n, _ in module.named_parameters()}


def reference_weights(cfg: Config, seed: int) -> Dict[str, torch.Tensor]:
    """The initial weights of the single-rank model with this seed, by canonical name. Every
    TP/PP layout starts from (its slice of) these, so layouts are comparable step by step."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        full = VLGPTModel(cfg.model, ParallelState.single(), visual_loss_weight=cfg.training.visual_loss_weight)
    return {canonical_name(n, False, 0, cfg.model.num_layers): p.detach()
            for n, p in full.named_parameters()}


def release_weights(path: str, cfg: Config, state: ParallelState) -> Dict[str, torch.Tensor]:
    """This rank's slice of a release checkpoint (tools/convert_checkpoint.py import-hf), by
    canonical name. A checkpoint with a smaller vocabulary (an HF LLaMA before [IMG]/[/IMG]
    were added) grows: new embedding and LM-head rows start at the mean of the existing rows."""
    ck_model, ck_tp, ck_pp = read_checkpoint_meta(path)
    shards, ck_model, ck_tp, ck_pp = load_release_shards(path)
    extra = {k: v for k, v in shards[(0, 0)].items() if k.startswith("embedding.visual_proj")}
    extra.update({k: v for k, v in shards[(0, ck_pp - 1)].items() if k.startswith("head.regression")})
    hf = shards_to_hf(shards, ck_model, ck_tp, ck_pp)
    m = cfg.model
    for key, ours in (("hidden_size", m.hidden_size), ("num_layers", m.num_layers),
                      ("num_attention_heads", m.num_attention_heads), ("kv_heads", m.kv_heads),
                      ("ffn_hidden_size", m.ffn_hidden_size)):
        if getattr(ck_model, key) != ours:
            raise CheckpointError(f"{path}: {key} = {getattr(ck_model, key)}, the run has {ours}")
    if ck_model.vocab_size > m.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {ck_model.vocab_size} tokens does not fit --vocab-size "
                              f"{m.vocab_size}")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in hf and hf[key].shape[0] < m.vocab_size:
            t = hf[key]
            mean = t.float().mean(0, keepdim=True).to(t.dtype)
            hf[key] = torch.cat([t, mean.expand(m.vocab_size - t.shape[0], -1)])
    shard = hf_to_shards(hf, m, state.tp, state.pp)[(state.tp_rank, state.pp_rank)]
    shard.update(extra)
    return shard


def _load_canonical(module: nn.Module, names: Dict[str, str], weights: Dict[str, torch.Tensor],
                    source: str) -> List[str]:
    """Copies this rank's slice of each weight into module; returns the canonical names that
    `weights` lacks."""
    missing = []
    with torch.no_grad():
        for local, p in module.named_parameters():
            name = names[local]
            if name not in weights:
                missing.append(name)
                continue
            src = weights[name]
            if src.shape != p.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(src.shape)}, the model {tuple(p.shape)}")
            p.copy_(src)
    return missing


def _init_visual(module: nn.Module, names: Dict[str, str], which: Sequence[str], std: float, seed: int) -> None:
    """Fresh visual projection / regression head (the parts an HF LLaMA does not have)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for local, p in module.named_parameters():
            if names[local] in which:
                if names[local].endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def build_model(cfg: Config, state: ParallelState, rng_tracker, new_token_ids: Sequence[int],
                log=print) -> BuiltModel:
    m, t = cfg.model, cfg.training
    pipeline = state.pp > 1
    if pipeline:
        module = build_pipeline_module(m, state, rng_tracker, t.recompute_activations, cfg.data.reset_attention_mask,
                                       t.visual_loss_weight)
        offset = 0
    else:
        module = VLGPTModel(m, state, rng_tracker, t.recompute_activations, t.visual_loss_weight)
        offset = module.layer_offset
    names = _names(module, pipeline, offset, m.num_layers)
    loaded_from = None
    if cfg.checkpoint.load and _is_release(cfg.checkpoint.load):
        weights = release_weights(cfg.checkpoint.load, cfg, state)
        missing = _load_canonical(module, names, weights, cfg.checkpoint.load)
        if missing:
            bad = [n for n in missing if n not in VISUAL_PARAMS]
            if bad:
                raise CheckpointError(f"{cfg.checkpoint.load}: lacks {bad}")
            _init_visual(module, names, missing, m.init_method_std, t.seed)
            log(f"loaded pretrained weights from {cfg.checkpoint.load}; newly initialised: {', '.join(missing)}")
        loaded_from = cfg.checkpoint.load
    else:
        _load_canonical(module, names, _sharded_reference(cfg, state), "initialisation")
    if cfg.lora.lora_rank > 0:
        counts = apply_lora(module, cfg.lora, new_token_ids, t.seed,
                            lambda n: canonical_name(n, pipeline, offset, m.num_layers))
    else:
        counts = parameter_counts(module.parameters())
    return BuiltModel(module, pipeline, counts, loaded_from)


def _sharded_reference(cfg: Config, state: ParallelState) -> Dict[str, torch.Tensor]:
    ref = reference_weights(cfg, cfg.training.seed)
    llama = {k: v for k, v in ref.items() if k not in VISUAL_PARAMS}
    hf = shards_to_hf({(0, 0): llama}, cfg.model, 1, 1)
    shard = hf_to_shards(hf, cfg.model, state.tp, state.pp)[(state.tp_rank, state.pp_rank)]
    shard.update({k: v for k, v in ref.items() if k in VISUAL_PARAMS})
    return shard


def _is_release(path: str) -> bool:
    import os
    try:
        with open(os.path.join(path, "latest")) as fh:
            return fh.read().strip() == "release"
    except FileNotFoundError:
        return False


def initialize_engine(cfg: Config, state: ParallelState, built: BuiltModel, world_size: int):
    """deepspeed.initialize with the config-derived JSON, our mpu, torch AdamW over the
    trainable parameters and the schedule; returns (engine, ds_config)."""
    import deepspeed
    ds_config = deepspeed_config(cfg, world_size)
    optimizer = build_optimizer(built.module, cfg.optimizer, effective_zero_stage(cfg))
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.training.train_iters)
    engine, _, _, _ = deepspeed.initialize(
        model=built.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=None if built.pipeline else state.as_mpu(), dist_init_required=False)
    return engine, ds_config

"""Model construction for a run: the VL-GPT stage (plain module, or a DeepSpeed
PipelineModule when pp > 1), its layout-independent initial weights, the pretrained
weights of a release checkpoint, LoRA, and the DeepSpeed engine around it all."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..checkpoint.layout import CheckpointError, is_release
from ..checkpoint.names import VOCAB_TENSORS, canonical_name, tp_split  # noqa: F401  (tests read build.VOCAB_TENSORS)
from ..checkpoint.release import read_checkpoint_meta, shard_for
from ..config import Config, deepspeed_config, effective_zero_stage
from ..model.lora import apply_lora, parameter_counts
from ..model.vlgpt import VLGPTModel
from ..parallel.layers import shard_parts
from ..parallel.state import ParallelState, release_shm_name
from .pipeline_stages import build_pipeline_module
from .optim import build_optimizer, build_scheduler
from .partitioned import assign, construction, full_shape

VISUAL_PARAMS = ("embedding.visual_proj.weight", "embedding.visual_proj.bias",
                 "head.regression.weight", "head.regression.bias")


@dataclass
class BuiltModel:
    module: nn.Module
    pipeline: bool
    counts: Dict[str, int]
    loaded_from: Optional[str] = None
    resharded: Optional[object] = None
    """The checkpoint's TrainingState when --load names one written under another layout."""
    layout_then: Optional[dict] = None


def _names(module: nn.Module, pipeline: bool, offset: int, num_layers: int) -> Dict[str, str]:
    return {n: canonical_name(n, pipeline, offset, num_layers) for n, _ in module.named_parameters()}


def iter_initial_weights(module: nn.Module, names: Dict[str, str], cfg: Config, state: ParallelState,
                         only: Optional[Sequence[str]] = None):
    """(canonical name, this rank's TP slice) of each initial weight, one at a time. Each full tensor comes
    from a generator keyed by (seed, name) and is cut like the TP layers cut it, so every
    TP/PP layout starts from the same model; one full tensor exists at a time (the largest is
    the vocabulary table), never the whole model. `only`: just these canonical names."""
    m, seed = cfg.model, cfg.training.seed
    for local, p in module.named_parameters():
        name = names[local]
        if only is not None and name not in only:
            continue
        split = tp_split(name, cfg)
        local_shape = full_shape(p)
        if split is None:
            shape = tuple(local_shape)
        elif split[0] == "vocab":
            shape = (m.vocab_size, local_shape[1])
        elif split[1] == 0:
            shape = (sum(split[0]), local_shape[1])
        else:
            shape = (local_shape[0], local_shape[1] * state.tp)
        # The vocabulary tables are drawn straight into their padded size (padding rows, never
        # predicted, stay zero): the same numbers as a [vocab, h] draw, one tensor fewer.
        rows = m.padded_vocab_size(state.tp) if split is not None and split[0] == "vocab" else shape[0]
        if name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(".bias"):
            full = torch.zeros(shape)
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.zeros((rows,) + tuple(shape[1:]))
            full[:shape[0]].normal_(0.0, m.init_method_std, generator=gen)
        if split is not None and state.tp > 1:
            parts = [rows] if split[0] == "vocab" else split[0] if split[1] == 0 else [shape[1]]
            full = shard_parts(full, parts, state.tp_rank, state.tp, split[1])
        yield name, full.to(p.dtype)


def initial_weights(module: nn.Module, names: Dict[str, str], cfg: Config, state: ParallelState,
                    only: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """iter_initial_weights as a dict (for the few weights a release checkpoint lacks)."""
    return dict(iter_initial_weights(module, names, cfg, state, only))


def release_weights(path: str, cfg: Config, state: ParallelState) -> Mapping[str, torch.Tensor]:
    """This rank's slice of a release checkpoint (tools/convert_checkpoint.py import-hf), by
    canonical name, whatever TP/PP layout wrote it: each tensor is read and cut when asked for
    (a rank, ZeRO-3's included, holds the stored slices of one tensor beside its own weights,
    never the whole checkpoint). A checkpoint with a smaller vocabulary (an HF LLaMA before
    [IMG]/[/IMG] were added) grows: new embedding and LM-head rows start at the mean of the
    existing rows."""
    ck_model, _, _ = read_checkpoint_meta(path)
    m = cfg.model
    for key, ours in (("hidden_size", m.hidden_size), ("num_layers", m.num_layers),
                      ("num_attention_heads", m.num_attention_heads), ("kv_heads", m.kv_heads),
                      ("ffn_hidden_size", m.ffn_hidden_size)):
        if getattr(ck_model, key) != ours:
            raise CheckpointError(f"{path}: {key} = {getattr(ck_model, key)}, the run has {ours}")
    if ck_model.vocab_size > m.vocab_size:
        raise CheckpointError(f"{path}: vocabulary of {ck_model.vocab_size} tokens does not fit --vocab-size "
                              f"{m.vocab_size}")
    return shard_for(path, cfg, state.tp, state.pp, state.tp_rank, state.pp_rank)


def _load_canonical(module: nn.Module, names: Dict[str, str], weights: Mapping[str, torch.Tensor],
                    source: str) -> List[str]:
    """Copies this rank's slice of each weight into module; returns the canonical names that
    `weights` lacks."""
    missing = []
    for local, p in module.named_parameters():
        name = names[local]
        if name not in weights:
            missing.append(name)
            continue
        src = weights[name]
        if src.shape != full_shape(p):
            raise CheckpointError(f"{source}: {name} has shape {tuple(src.shape)}, the model {tuple(full_shape(p))}")
        assign(p, src)
    return missing


def build_model(cfg: Config, state: ParallelState, rng_tracker, new_token_ids: Sequence[int],
                log=print) -> BuiltModel:
    m, t = cfg.model, cfg.training
    pipeline = state.pp > 1
    with construction(cfg, state, state.world_size, pipeline):
        if pipeline:
            module = build_pipeline_module(m, state, rng_tracker, t.recompute_activations,
                                           cfg.data.reset_attention_mask, t.visual_loss_weight)
            offset = 0
        else:
            module = VLGPTModel(m, state, rng_tracker, t.recompute_activations, t.visual_loss_weight)
            offset = module.layer_offset
    names = _names(module, pipeline, offset, m.num_layers)
    loaded_from = None
    layout_then = _layout_change(cfg, state)
    if cfg.checkpoint.load and is_release(cfg.checkpoint.load):
        weights = release_weights(cfg.checkpoint.load, cfg, state)
        missing = _load_canonical(module, names, weights, cfg.checkpoint.load)
        if missing:
            bad = [n for n in missing if n not in VISUAL_PARAMS]
            if bad:
                raise CheckpointError(f"{cfg.checkpoint.load}: lacks {bad}")
            _load_canonical(module, names, initial_weights(module, names, cfg, state, only=missing),
                            "initialisation")
            log(f"loaded pretrained weights from {cfg.checkpoint.load}; newly initialised: {', '.join(missing)}")
        loaded_from = cfg.checkpoint.load
    elif cfg.checkpoint.load and cfg.checkpoint.finetune:
        from ..checkpoint.merged import MergedCheckpoint
        from .reshard import resharded_lazily
        merged = MergedCheckpoint(cfg.checkpoint.load, cfg, cfg.checkpoint.ckpt_step)
        if merged.tp == state.tp:
            weights, moved = merged.rank(state.tp_rank), ""
        else:
            weights = resharded_lazily([merged.rank(r) for r in range(merged.tp)], module, names, cfg, state)
            moved = f", cut from TP {merged.tp} to TP {state.tp}"
        missing = _load_canonical(module, names, weights, cfg.checkpoint.load)
        if missing:
            raise CheckpointError(f"{cfg.checkpoint.load}: lacks {missing}")
        log(f"--finetune: weights of {cfg.checkpoint.load} (adapters merged{moved}); iteration, optimizer, "
            "schedule and data position start fresh")
        loaded_from = cfg.checkpoint.load
    elif layout_then is None:
        params = {names[local]: p for local, p in module.named_parameters()}
        for name, weight in iter_initial_weights(module, names, cfg, state):
            assign(params[name], weight)
    if cfg.lora.lora_rank > 0:
        counts = apply_lora(module, cfg.lora, new_token_ids, t.seed,
                            lambda n: canonical_name(n, pipeline, offset, m.num_layers))
    else:
        counts = parameter_counts(module.parameters())
    resharded = None
    if layout_then is not None:   # every weight, LoRA's included, from the checkpoint, cut for this rank
        from ..checkpoint.training_reader import read_training_state
        from .reshard import resharded_weights
        resharded = read_training_state(cfg.checkpoint.load, cfg.checkpoint.ckpt_step)
        names = _names(module, pipeline, offset, m.num_layers)
        params = {names[local]: p for local, p in module.named_parameters()}
        for name, weight in resharded_weights(resharded, module, names, cfg, state).items():
            assign(params[name], weight.to(params[name].dtype))
    return BuiltModel(module, pipeline, counts, loaded_from, resharded, layout_then)


def _layout_change(cfg: Config, state: ParallelState) -> Optional[dict]:
    """The layout that wrote the training checkpoint --load names, when it is not this run's
    (None otherwise: same layout, a release or --finetune load, or nothing to load)."""
    c = cfg.checkpoint
    if not c.load or c.finetune or is_release(c.load) or not os.path.isdir(c.load):
        return None
    from .reshard import same_layout, saved_layout
    then = saved_layout(c.load, c.ckpt_step)
    now = run_layout(cfg, state)
    return then if then is not None and not same_layout(then, now) else None


def run_layout(cfg: Config, state: ParallelState) -> dict:
    """This run's layout as training/reshard.py compares and describes layouts: axis sizes and
    the ZeRO stage (which decides how the optimizer state is cut)."""
    return dict(state.rank_layout.sizes, zero=effective_zero_stage(cfg))


def make_engine(cfg, module: nn.Module, world_size: int, mpu=None):
    """deepspeed.initialize with the config-derived JSON, torch AdamW over the trainable
    parameters and the schedule (any stage's config); returns (engine, ds_config)."""
    import deepspeed
    ds_config = deepspeed_config(cfg, world_size)
    optimizer = build_optimizer(module, cfg.optimizer, effective_zero_stage(cfg))
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.training.train_iters)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu, dist_init_required=False)
    release_shm_name()
    return engine, ds_config


def initialize_engine(cfg: Config, state: ParallelState, built: BuiltModel, world_size: int):
    """The VL-GPT engine: our mpu unless the module is a pipeline (which brings its own)."""
    return make_engine(cfg, built.module, world_size, mpu=None if built.pipeline else state.as_mpu())

"""Resuming a training checkpoint under another TP / PP / DP / ZeRO layout.

The checkpoint is read offline, as export-hf reads it (checkpoint/training_reader.py): the
fp32 weights, Adam's two moments, the step, the schedule, the data position. Each rank's
tensor is copied from the old TP slices that hold it (checkpoint/slicing.py, with the split
rules the layers use); the weights go into the model before DeepSpeed wraps it (so its fp32
copies start from them), the moments into DeepSpeed's optimizer partitions through its
tensor-fragment API afterwards. DeepSpeed's own loader is not used: it reads only the layout
that wrote the files.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ..checkpoint.layout import CheckpointError, read_latest, tag_name
from ..checkpoint.slicing import cut_for_rank, cut_lazily
from ..checkpoint.training_reader import LazyTensors


def saved_layout(load_dir: str, ckpt_step: Optional[int]) -> Optional[dict]:
    """tp, pp, dp, zero of the run that wrote the checkpoint --load names (None: not a
    training checkpoint, or nothing there yet)."""
    import glob

    import yaml

    from ..config import Config, effective_zero_stage
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None or tag == "release":
        return None
    tag_dir = os.path.join(load_dir, tag)
    try:
        with open(os.path.join(tag_dir, "config.yaml")) as fh:
            cfg = Config.from_dict(yaml.safe_load(fh), os.path.join(tag_dir, "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError):   # not ours, or damaged: the checkpoint check says which
        return None
    p = cfg.parallel
    zero = effective_zero_stage(cfg)
    # DP size from the optimizer files' names (nothing is unpickled here: a damaged file is
    # named later by the checkpoint check); ZeRO-0 has none and loads at any DP size.
    ranks = {re.search(r"zero_pp_rank_(\d+)_mp_rank_00_optim", f).group(1)
             for f in glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))}
    if zero and not ranks:   # incomplete: the checkpoint check names the missing files
        return None
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "dp": len(ranks) if zero else None, "zero": zero}


def describe(layout: dict) -> str:
    dp = layout["dp"] if layout["dp"] is not None else "any"
    return f"tp {layout['tp']} x pp {layout['pp']} x dp {dp}, ZeRO-{layout['zero']}"


def same_layout(then: dict, now: dict) -> bool:
    """ZeRO-0 checkpoints (dp None) load at any data-parallel size."""
    return all(then[k] == now[k] for k in ("tp", "pp", "zero")) and then["dp"] in (None, now["dp"])


def _split_rule(name: str, param: nn.Parameter, cfg):
    """How a parameter is cut over TP (checkpoint.slicing.Rule): None (whole on every rank),
    ("vocab", 0), or (fused parts or None, dim)."""
    from ..checkpoint.names import tp_split
    if not getattr(param, "tensor_model_parallel", False):
        return None
    fused = tp_split(name, cfg)
    return fused if fused is not None else (None, param.partition_dim)


def reshard(name: str, slices, param: nn.Parameter, cfg, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's tensor of `name` from the old TP ranks' slices (rank order)."""
    return cut_for_rank(_split_rule(name, param, cfg), slices, cfg.model, tp, tp_rank)


def resharded_lazily(sources: Sequence[Mapping], module: nn.Module, names: Dict[str, str], cfg,
                     parallel) -> LazyTensors:
    """This rank's tensor of each of module's parameters, cut when asked for from `sources`
    (canonical name -> slice, one mapping per TP rank of another TP size, rank order)."""
    params = {names[local]: p for local, p in module.named_parameters()}
    rules = {name: _split_rule(name, p, cfg) for name, p in params.items() if name in sources[0]}
    return cut_lazily(sources, rules, cfg.model, parallel.tp, parallel.tp_rank)


def resharded_weights(state, module: nn.Module, names: Dict[str, str], cfg, parallel) -> Dict[str, torch.Tensor]:
    """This rank's weights (fp32 masters for the trainable ones), by canonical name."""
    per_rank = state.weights.per_tp_rank
    out = {}
    for local, p in module.named_parameters():
        name = names[local]
        if name not in per_rank[0]:
            raise CheckpointError(f"{state.weights.path}: lacks {name} (another model or LoRA setting?)")
        slices = [state.moments[r][name]["fp32"] if name in state.moments[r] else per_rank[r][name]
                  for r in range(len(per_rank))]
        out[name] = reshard(name, slices, p, cfg, parallel.tp, parallel.tp_rank)
    return out


def restore_optimizer(engine, module: nn.Module, names: Dict[str, str], state, cfg, parallel) -> None:
    """Adam's moments and step into the new engine's optimizer partitions, the schedule
    into its scheduler, the step counters into the engine."""
    from deepspeed.utils import safe_set_full_optimizer_state
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # torch's AdamW creates its state at the first step; DeepSpeed's fragment API writes into
    # that state, so it is made now (zeros, this step count) and linked to the parameters.
    # ZeRO-3 hands its fp32 partitions to the optimizer's groups only while it steps them.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [flat for group in optimizer.param_groups for flat in group["params"]]
    for flat in flats:
        if not optimizer.state.get(flat):
            optimizer.state[flat] = {"step": torch.tensor(float(state.step)),
                                     "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format)}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:   # ZeRO-1/2 (ZeRO-3 reads the optimizer state directly)
        link()
    for local, p in module.named_parameters():
        if not p.requires_grad:
            continue
        name = names[local]
        if name not in state.moments[0]:
            raise CheckpointError(f"{state.weights.path}: no optimizer state for {name}")
        entries = [m[name] for m in state.moments]   # read now, one parameter at a time
        for key in ("exp_avg", "exp_avg_sq"):
            value = reshard(name, [e[key] for e in entries], p, cfg, parallel.tp, parallel.tp_rank)
            safe_set_full_optimizer_state(p, value.to(torch.float32), key)
    scheduler = engine.lr_scheduler
    if state.lr_scheduler is not None and scheduler is not None:
        # Only the position moves over: a pipeline stage may hold fewer parameter groups than
        # the run that wrote the checkpoint (the schedule is the same function of the step).
        scheduler.last_epoch = state.lr_scheduler["last_epoch"]
        scheduler._step_count = state.lr_scheduler.get("_step_count", scheduler.last_epoch + 1)
        rates = scheduler.get_lr()   # the rate of the coming update, which the optimizer's groups carry
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        scheduler._last_lr = list(rates)
    client = state.weights.client
    engine.global_steps = int(client.get("iteration", 0))
    engine.global_samples = int(client.get("consumed_train_samples", 0))

"""The weights of a training checkpoint (``pretrain_vlgpt.py --save``), read offline from
DeepSpeed's files into layout-independent names, one dict per tensor-parallel rank —
whatever TP, PP and ZeRO stage wrote it. No process group and no model are built.

What DeepSpeed writes in ``DIR/iter_XXXXXXX/`` (file names carry the model-parallel rank,
which is our TP rank, and the data-parallel rank):

- ZeRO 0-2, one stage: ``mp_rank_{tp:02d}_model_states.pt`` holds the module's state dict
  (this TP rank's slices, in the training dtype).
- Pipelines: ``layer_{idx:02d}-model_{tp:02d}-model_states.pt`` holds one pipeline layer's
  state dict (idx 0 the embedding, 1..L the decoder layers, L+1 the head).
- ZeRO-3: the module files hold placeholders. Trainable parameters live in the fp32
  ``fp32_flat_groups`` of each ``[bf16_]zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``: per
  parameter (in ``param_shapes`` order) every DP rank holds ceil(numel / dp) consecutive
  elements, the last rank's zero-padded. Frozen parameters (the LoRA base) are in each
  model file's ``frozen_param_fragments``, cut the same way.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import yaml

from ..config import Config, effective_zero_stage
from ..training.build import canonical_name
from ..training.checkpoint import read_latest, tag_name
from .hf import CheckpointError

Tensors = Dict[str, torch.Tensor]


@dataclass
class TrainedWeights:
    cfg: Config
    path: str            # DIR/iter_XXXXXXX
    iteration: int
    client: dict         # our client state (iteration, samples, image_token_ids, ...)
    per_tp_rank: List[Tensors]   # canonical name -> this TP rank's slice


def _load(path: str, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (checkpoint incomplete, or written with another layout)") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None


def _parameters_only(sd: Tensors, buffer_names) -> Tensors:
    buffers = set(buffer_names or ())
    return {k: v for k, v in sd.items() if k not in buffers}


def _optim_file(model_file: str) -> str:
    """The optimizer file beside a ZeRO-3 model file (bf16 runs prefix it with ``bf16_``)."""
    plain = model_file.replace("_model_states.pt", "_optim_states.pt")
    bf16 = os.path.join(os.path.dirname(plain), "bf16_" + os.path.basename(plain))
    return bf16 if os.path.isfile(bf16) and not os.path.isfile(plain) else plain


def _zero3_rank(tag_dir: str, tp_rank: int) -> tuple:
    """(parameters by module name, client state) of one TP rank of a ZeRO-3 checkpoint."""
    models = sorted(glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt")),
                    key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    if not models:
        raise CheckpointError(f"{tag_dir}: no zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt")
    states = [_load(f) for f in models]
    dp = len(states)
    optims = [_load(_optim_file(f), mmap=True)["optimizer_state_dict"] for f in models]
    if optims[0]["partition_count"] != dp:
        raise CheckpointError(f"{tag_dir}: optimizer state was partitioned {optims[0]['partition_count']} ways "
                              f"but {dp} rank files exist for TP rank {tp_rank}")
    out: Tensors = {}

    def gather(pieces, shape, name):
        numel = math.prod(shape)
        full = torch.cat([p.reshape(-1) for p in pieces])
        if full.numel() < numel:
            raise CheckpointError(f"{tag_dir}: {name} has {full.numel()} of its {numel} elements")
        return full[:numel].view(shape).clone()

    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
        out[name] = gather([s["frozen_param_fragments"][name] for s in states], tuple(shape), name)
    for group, shapes in enumerate(states[0]["param_shapes"]):
        flats = [o["fp32_flat_groups"][group] for o in optims]
        offset = 0
        for name, shape in shapes.items():
            per_rank = math.ceil(math.prod(shape) / dp)
            out[name] = gather([f.narrow(0, offset, per_rank) for f in flats], tuple(shape), name)
            offset += per_rank
    return out, states[0]


def read_training_checkpoint(load_dir: str, iteration: Optional[int] = None) -> TrainedWeights:
    """Every weight of the checkpoint `latest` names (or of `iteration`)."""
    tag = tag_name(iteration) if iteration is not None else read_latest(load_dir)
    if tag is None:
        raise CheckpointError(f"{load_dir}: no 'latest' file: not a training checkpoint directory")
    if tag == "release":
        raise CheckpointError(f"{load_dir}: a release checkpoint (import-hf), not a training one")
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        have = sorted(d for d in os.listdir(load_dir) if d.startswith("iter_"))
        raise CheckpointError(f"{load_dir}: checkpoint {tag} does not exist (have: {', '.join(have) or 'none'})")
    try:
        with open(os.path.join(tag_dir, "config.yaml")) as fh:
            cfg = Config.from_dict(yaml.safe_load(fh), os.path.join(tag_dir, "config.yaml"))
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: config.yaml missing (not written by pretrain_vlgpt.py?)") from None
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    layers = cfg.model.num_layers
    per_tp_rank: List[Tensors] = []
    client: dict = {}
    for r in range(tp):
        if effective_zero_stage(cfg) == 3:
            params, client_rank = _zero3_rank(tag_dir, r)
            names = {k: canonical_name(k, False, 0, layers) for k in params}
        elif pp == 1:
            client_rank = _load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
            params = _parameters_only(client_rank["module"], client_rank.get("buffer_names"))
            names = {k: canonical_name(k, False, 0, layers) for k in params}
        else:
            client_rank = _load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
            params, names = {}, {}
            for idx in range(layers + 2):
                for k, v in _load(os.path.join(tag_dir, f"layer_{idx:02d}-model_{r:02d}-model_states.pt")).items():
                    params[f"{idx}.{k}"] = v
                    names[f"{idx}.{k}"] = canonical_name(f"{idx}.{k}", True, 0, layers)
        per_tp_rank.append({names[k]: v for k, v in params.items()})
        if r == 0:
            client = {k: v for k, v in client_rank.items()
                      if k not in ("module", "optimizer", "param_shapes", "frozen_param_shapes",
                                   "frozen_param_fragments", "lr_scheduler", "ds_config")}
    return TrainedWeights(cfg, tag_dir, int(client.get("iteration", 0)), client, per_tp_rank)

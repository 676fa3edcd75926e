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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
import yaml

from ..config import Config, ConfigError, effective_zero_stage
from .layout import STAGE1_PARTS, CheckpointError, read_latest, tag_name
from .names import canonical_name


Tensors = Dict[str, torch.Tensor]


class LazyTensors(Mapping):
    """name -> value, each value made when asked for (from memory-mapped files): a reader
    of a whole checkpoint holds one parameter at a time, never the model."""

    def __init__(self, loaders: Dict[str, Callable[[], object]]):
        self._loaders = loaders

    def __getitem__(self, name):
        return self._loaders[name]()

    def __contains__(self, name) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


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
    states = [_load(f, mmap=True) for f in models]
    dp = len(states)
    optims = [_load(_optim_file(f), mmap=True)["optimizer_state_dict"] for f in models]
    if optims[0]["partition_count"] != dp:
        raise CheckpointError(f"{tag_dir}: optimizer state was partitioned {optims[0]['partition_count']} ways "
                              f"but {dp} rank files exist for TP rank {tp_rank}")
    loaders = {}

    def gather(pieces, shape, name):
        numel = math.prod(shape)
        full = torch.cat([p.reshape(-1) for p in pieces])
        if full.numel() < numel:
            raise CheckpointError(f"{tag_dir}: {name} has {full.numel()} of its {numel} elements")
        return full[:numel].view(shape).clone()

    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
        loaders[name] = lambda name=name, shape=tuple(shape): gather(
            [s["frozen_param_fragments"][name] for s in states], shape, name)
    for group, shapes in enumerate(states[0]["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            per_rank = math.ceil(math.prod(shape) / dp)
            loaders[name] = lambda name=name, shape=tuple(shape), group=group, offset=offset, n=per_rank: gather(
                [o["fp32_flat_groups"][group].narrow(0, offset, n) for o in optims], shape, name)
            offset += per_rank
    out = LazyTensors(loaders)
    return out, states[0]


def is_stage1_checkpoint(tag_dir: str, raw=None) -> bool:
    """A train_tokenizer.py checkpoint: it holds the exported parts, and its config has
    stage 1's model keys (the CLIP tower)."""
    if all(os.path.isdir(os.path.join(tag_dir, p)) for p in STAGE1_PARTS):
        return True
    model = raw.get("model") if isinstance(raw, dict) else None
    return isinstance(model, dict) and "clip_model" in model


def read_run_config(tag_dir: str) -> Config:
    """The pretraining/finetuning config a checkpoint was written with; a stage-1 checkpoint,
    a missing or damaged config.yaml are one line naming what it is."""
    path = os.path.join(tag_dir, "config.yaml")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        if is_stage1_checkpoint(tag_dir):
            raw = None
        else:
            raise CheckpointError(f"{tag_dir}: config.yaml missing (not written by pretrain_vlgpt.py?)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable YAML ({' '.join(str(exc).split())[:200]})") from None
    if is_stage1_checkpoint(tag_dir, raw):
        raise CheckpointError(f"{tag_dir}: a stage-1 (image tokenizer) checkpoint of train_tokenizer.py, not a VL-GPT "
                              "one; export it with tools/export_tokenizer.py --load "
                              f"{os.path.dirname(os.path.abspath(tag_dir))} --save DIR")
    try:
        return Config.from_dict(raw, path)
    except ConfigError as exc:   # written by another program or version: the checkpoint is the problem
        raise CheckpointError(f"{path}: not a pretrain_vlgpt.py / finetune_instruct.py config ({exc})") from None


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
    cfg = read_run_config(tag_dir)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    layers = cfg.model.num_layers
    per_tp_rank: List[Tensors] = []
    client: dict = {}
    for r in range(tp):
        if effective_zero_stage(cfg) == 3:
            params, client_rank = _zero3_rank(tag_dir, r)
            names = {k: canonical_name(k, False, 0, layers) for k in params}
        elif pp == 1:
            client_rank = _load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"), mmap=True)
            params = _parameters_only(client_rank["module"], client_rank.get("buffer_names"))
            names = {k: canonical_name(k, False, 0, layers) for k in params}
        else:
            client_rank = _load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
            params, names = {}, {}
            for idx in range(layers + 2):
                for k, v in _load(os.path.join(tag_dir, f"layer_{idx:02d}-model_{r:02d}-model_states.pt"),
                                  mmap=True).items():
                    params[f"{idx}.{k}"] = v
                    names[f"{idx}.{k}"] = canonical_name(f"{idx}.{k}", True, 0, layers)
        if isinstance(params, LazyTensors):
            per_tp_rank.append(LazyTensors({names[k]: params._loaders[k] for k in params}))
        else:
            per_tp_rank.append({names[k]: v for k, v in params.items()})
        if r == 0:
            client = {k: v for k, v in client_rank.items()
                      if k not in ("module", "optimizer", "param_shapes", "frozen_param_shapes",
                                   "frozen_param_fragments", "lr_scheduler", "ds_config")}
    return TrainedWeights(cfg, tag_dir, int(client.get("iteration", 0)), client, per_tp_rank)


@dataclass
class TrainingState:
    """Everything a run under another layout needs from a training checkpoint: the weights
    (TrainedWeights), Adam's moments and the fp32 master weights of the trainable
    parameters, by canonical name per TP rank, the optimizer's step and the schedule."""
    weights: TrainedWeights
    layout: dict                 # tp, pp, dp, zero of the run that wrote it
    moments: List[Dict[str, Tensors]]   # per TP rank: name -> {"fp32", "exp_avg", "exp_avg_sq"}
    step: float
    lr_scheduler: Optional[dict]


_MOMENT_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _zero12_moments(files: List[str], shapes: Dict[str, tuple], pipeline: bool, layers: int) -> tuple:
    """(name -> {fp32, exp_avg, exp_avg_sq} made on demand, step) from the DP ranks' ZeRO-1/2
    files of one model-parallel rank: each rank's partition of each parameter group, and
    DeepSpeed's map of where each parameter's fragment sits in it (param_slice_mappings).
    shapes: the parameters' shapes by canonical name."""
    where: Dict[str, list] = {}
    step = 0.0
    for f in files:   # in DP rank order: fragments concatenate into the whole parameter
        sd = _load(f, mmap=True)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]["state"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            flats = {"fp32": sd["single_partition_of_fp32_groups"][group],
                     "exp_avg": base[group]["exp_avg"], "exp_avg_sq": base[group]["exp_avg_sq"]}
            step = float(base[group]["step"])
            for name, frag in mapping.items():
                where.setdefault(canonical_name(name, pipeline, 0, layers), []).append((flats, frag))

    def load(name):
        return {key: torch.cat([flats[key].narrow(0, frag.start, frag.numel) for flats, frag in where[name]])
                .view(shapes[name]) for key in _MOMENT_KEYS}
    return LazyTensors({name: (lambda name=name: load(name)) for name in where}), step


def _zero3_moments(tag_dir: str, tp_rank: int, layers: int) -> tuple:
    """The same for ZeRO-3: per parameter (param_shapes order) ceil(numel / dp) elements per
    DP rank, as the weights (_zero3_rank)."""
    models = sorted(glob.glob(os.path.join(tag_dir, f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt")),
                    key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f).group(1)))
    shapes = _load(models[0], mmap=True)["param_shapes"]
    optims = [_load(_optim_file(f), mmap=True)["optimizer_state_dict"] for f in models]
    dp = len(optims)
    loaders = {}
    step = 0.0

    def load(group, offset, per_rank, shape):
        flats = [{"fp32": o["fp32_flat_groups"][group], "exp_avg": o["optimizer_state_dict"]["state"][group]["exp_avg"],
                  "exp_avg_sq": o["optimizer_state_dict"]["state"][group]["exp_avg_sq"]} for o in optims]
        return {key: torch.cat([f[key].narrow(0, offset, per_rank) for f in flats])[:math.prod(shape)].view(shape)
                for key in _MOMENT_KEYS}
    for group, group_shapes in enumerate(shapes):
        step = float(optims[0]["optimizer_state_dict"]["state"][group]["step"])
        offset = 0
        for name, shape in group_shapes.items():
            per_rank = math.ceil(math.prod(shape) / dp)
            loaders[canonical_name(name, False, 0, layers)] = \
                lambda g=group, o=offset, n=per_rank, sh=tuple(shape): load(g, o, n, sh)
            offset += per_rank
    return LazyTensors(loaders), step


def read_training_state(load_dir: str, iteration: Optional[int] = None) -> TrainingState:
    """Weights, optimizer moments, step and schedule of a ZeRO >= 1 training checkpoint,
    read offline whatever layout wrote it (ZeRO-0 keeps torch's per-index optimizer state,
    which names no parameter: refused)."""
    weights = read_training_checkpoint(load_dir, iteration)
    cfg, tag_dir = weights.cfg, weights.path
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    zero, layers = effective_zero_stage(cfg), cfg.model.num_layers
    if zero == 0:
        raise CheckpointError(f"{tag_dir}: written with ZeRO-0, whose optimizer state cannot be moved to another "
                              "layout; resume it under its own layout, or use --finetune for the weights only")
    moments: List[Dict[str, Tensors]] = [{} for _ in range(tp)]
    step = 0.0
    if zero == 3:
        for r in range(tp):
            moments[r], step = _zero3_moments(tag_dir, r, layers)
        model_file = glob.glob(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"))[0]
    else:
        by_mp: Dict[int, List[str]] = {}
        for f in glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_*_optim_states.pt")):
            m = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim", f)
            by_mp.setdefault(int(m.group(2)), []).append((int(m.group(1)), f))
        if len(by_mp) != tp * pp:
            raise CheckpointError(f"{tag_dir}: optimizer files for {len(by_mp)} model-parallel ranks, the run that "
                                  f"wrote it had tp {tp} x pp {pp}")
        shapes: List[Dict[str, tuple]] = [{} for _ in range(tp)]
        loaders: List[dict] = [{} for _ in range(tp)]
        for mp_rank, files in sorted(by_mp.items()):
            r = mp_rank % tp   # pipeline ranks: model-parallel rank = stage * tp + tp rank
            shapes[r].update({name: tuple(v.shape) for name, v in weights.per_tp_rank[r].items()})
            found, step = _zero12_moments([f for _, f in sorted(files)], shapes[r], pp > 1, layers)
            loaders[r].update(found._loaders)
        moments = [LazyTensors(lo) for lo in loaders]
        model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    states = _load(model_file, mmap=True)
    layout = {"tp": tp, "pp": pp, "dp": int(states.get("dp_world_size", 1)), "zero": zero}
    return TrainingState(weights, layout, moments, step, states.get("lr_scheduler"))

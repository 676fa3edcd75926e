"""The release checkpoint: our language model as Megatron-layout safetensors shards, what
``tools/convert_checkpoint.py import-hf`` writes and ``--load`` of a run reads::

    C/latest                                   "release"
    C/release/mp_rank_{tp:02d}_{pp:03d}/model.safetensors   one (TP rank, PP stage) shard
    C/megatron_vl_checkpoint.json              model config, tp, pp, format version
    C/tokenizer/                               tokenizer files copied from the HF directory

Shard tensors are stored with *global* layer indices so any stage's file names the layers
it holds. Conversion only splits and concatenates tensors, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import Config, ModelConfig
from ..parallel.layers import shard_parts, unshard_parts
from .layout import IMAGE_TOKENIZER_DIR, LATEST, META_FILE, RELEASE, CheckpointError, read_json_object, read_latest
from .names import check_layout, layer_map, stage_layers, tp_split
from .slicing import cut_lazily
from .training_reader import LazyTensors
from .output_dir import atomic_directory


FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
Shards = Dict[Tuple[int, int], Dict[str, torch.Tensor]]  # (tp_rank, pp_rank) -> tensors


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def hf_to_shards(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig, tp: int, pp: int) -> Shards:
    check_layout(cfg, tp, pp)
    padded = cfg.padded_vocab_size(tp)
    tied = not cfg.untie_embeddings_and_output_weights
    missing = [k for k in ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
               if k not in hf_sd]
    if missing:
        raise CheckpointError(f"HF state dict lacks {missing}")
    shards: Shards = {}
    for stage in range(pp):
        for rank in range(tp):
            sd: Dict[str, torch.Tensor] = {}
            if stage == 0:
                emb = _pad_rows(hf_sd["model.embed_tokens.weight"], padded)
                sd["embedding.word_embeddings.weight"] = shard_parts(emb, [padded], rank, tp)
            for i in stage_layers(cfg, pp, stage):
                for ours, (theirs, parts, dim) in layer_map(cfg).items():
                    src = [hf_sd[f"model.layers.{i}.{n}"] for n in theirs]
                    full = torch.cat(src, dim=dim or 0) if len(src) > 1 else src[0]
                    sd[f"layers.{i}.{ours}"] = full.clone() if dim is None else shard_parts(full, parts, rank, tp, dim)
            if stage == pp - 1:
                sd["head.final_norm.weight"] = hf_sd["model.norm.weight"].clone()
                if not tied:
                    sd["head.output.weight"] = shard_parts(_pad_rows(hf_sd["lm_head.weight"], padded), [padded], rank, tp)
            shards[(rank, stage)] = sd
    return shards


def shards_to_hf(shards: Shards, cfg: ModelConfig, tp: int, pp: int) -> Dict[str, torch.Tensor]:
    """Full HF state dict; padded vocabulary rows are stripped."""
    padded = cfg.padded_vocab_size(tp)

    def gather(name, stage, parts, dim):
        try:
            return unshard_parts([shards[(r, stage)][name] for r in range(tp)], parts, dim)
        except KeyError:
            raise CheckpointError(f"shard (pp stage {stage}) lacks tensor {name}") from None

    hf: Dict[str, torch.Tensor] = {}
    hf["model.embed_tokens.weight"] = gather("embedding.word_embeddings.weight", 0, [padded], 0)[:cfg.vocab_size]
    for stage in range(pp):
        for i in stage_layers(cfg, pp, stage):
            for ours, (theirs, parts, dim) in layer_map(cfg).items():
                name = f"layers.{i}.{ours}"
                if dim is None:
                    hf[f"model.layers.{i}.{theirs[0]}"] = shards[(0, stage)][name]
                    continue
                full = gather(name, stage, parts, dim)
                for hf_name, piece in zip(theirs, full.split(parts, dim=dim) if len(theirs) > 1 else [full]):
                    hf[f"model.layers.{i}.{hf_name}"] = piece.contiguous()
    hf["model.norm.weight"] = shards[(0, pp - 1)]["head.final_norm.weight"]
    if cfg.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = gather("head.output.weight", pp - 1, [padded], 0)[:cfg.vocab_size].contiguous()
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"].contiguous()
    return hf


def copy_tokenizer_files(src: str, dst: str) -> int:
    n = 0
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            n += 1
    return n


def shard_dir(ckpt: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt, RELEASE, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def save_release_checkpoint(ckpt: str, shards: Shards, cfg: ModelConfig, tp: int, pp: int,
                            tokenizer_dir: Optional[str] = None, sources: Tuple[str, ...] = ()) -> None:
    with atomic_directory(ckpt, RELEASE, sources) as tmp:
        for (rank, stage), sd in shards.items():
            d = shard_dir(tmp, rank, stage)
            os.makedirs(d)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                      metadata={"format": "pt"})
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        meta = {"format": "megatron-vl-release", "version": FORMAT_VERSION, "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp, "model": dataclasses.asdict(cfg)}
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        with open(os.path.join(tmp, LATEST), "w") as fh:
            fh.write(RELEASE)


def _not_release(ckpt: str) -> str:
    """What a directory without the release metadata is, for the message that refuses it."""
    if not os.path.isdir(ckpt):
        return "no such directory"
    tag = read_latest(ckpt) or ""
    if tag.startswith("iter_"):
        tag_dir = os.path.join(ckpt, tag)
        if os.path.isdir(os.path.join(tag_dir, IMAGE_TOKENIZER_DIR)):
            return (f"a stage-1 (image tokenizer) training checkpoint ({tag}), not a converted language model; "
                    "tools/export_tokenizer.py exports it")
        return (f"a training checkpoint ({tag}), not a converted release checkpoint (import-hf output, "
                f"{META_FILE}); export it with tools/convert_checkpoint.py export-hf first")
    return f"not a megatron-vl checkpoint ({META_FILE} missing)"


def read_checkpoint_meta(ckpt: str) -> Tuple[ModelConfig, int, int]:
    path = os.path.join(ckpt, META_FILE)
    meta = read_json_object(path, lambda: f"{ckpt}: {_not_release(ckpt)}")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} (this code reads {FORMAT_VERSION})")
    return ModelConfig(**meta["model"]), meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]


def _shard_file(ckpt: str, rank: int, stage: int) -> str:
    path = os.path.join(shard_dir(ckpt, rank, stage), "model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt}: shard for tp rank {rank}, pp stage {stage} missing ({path})")
    return path


def load_release_shards(ckpt: str) -> Tuple[Shards, ModelConfig, int, int]:
    """Every shard, whole (export-hf writes the whole model)."""
    cfg, tp, pp = read_checkpoint_meta(ckpt)
    shards = {(rank, stage): load_file(_shard_file(ckpt, rank, stage)) for stage in range(pp) for rank in range(tp)}
    return shards, cfg, tp, pp


def _read_tensor(path: str, name: str) -> torch.Tensor:
    try:
        with safe_open(path, "pt") as fh:
            return fh.get_tensor(name)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read {name}: {exc}") from None


def stored_slices(ckpt: str, tp: int, pp: int) -> List[LazyTensors]:
    """Per TP rank of a tp x pp release checkpoint: canonical name -> the slice that rank
    stored, from whichever stage's file holds it. Only the files' headers are read here; a
    tensor is read from its memory-mapped file when asked for."""
    out = []
    for rank in range(tp):
        loaders = {}
        for stage in range(pp):
            path = _shard_file(ckpt, rank, stage)
            try:
                with safe_open(path, "pt") as fh:
                    names = list(fh.keys())
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read: {exc}") from None
            loaders.update({name: functools.partial(_read_tensor, path, name) for name in names})
        out.append(LazyTensors(loaders))
    return out


def _on_stage(name: str, cfg: ModelConfig, pp: int, stage: int) -> bool:
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) in stage_layers(cfg, pp, stage)
    if name.startswith("embedding."):
        return stage == 0
    return stage == pp - 1 if name.startswith("head.") else True


def shard_for(ckpt: str, run: Config, tp: int, pp: int, tp_rank: int, pp_rank: int) -> LazyTensors:
    """The tensors rank (tp_rank, pp_rank) of a tp x pp run of run.model holds, by canonical
    name, each cut when asked for from the checkpoint's slices, whatever layout wrote them:
    only the stored slices holding part of a tensor are read, only this rank's part is kept
    (checkpoint/slicing.py). Vocabulary tables with fewer tokens than run.model (an HF LLaMA
    before [IMG]/[/IMG] were added) grow: the new rows start at the mean of the old rows."""
    check_layout(run.model, tp, pp)
    ck, ck_tp, ck_pp = read_checkpoint_meta(ckpt)
    sources = stored_slices(ckpt, ck_tp, ck_pp)
    rules = {name: tp_split(name, run) for name in sources[0] if _on_stage(name, run.model, pp, pp_rank)}
    return cut_lazily(sources, rules, run.model, tp, tp_rank, rows_then=ck.vocab_size,
                      padded_then=ck.padded_vocab_size(ck_tp))


def load_shard_for(ckpt: str, tp: int, pp: int, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
    """The shard a (tp_rank, pp_rank) of a tp x pp run needs, whatever layout wrote the
    checkpoint (read one tensor at a time)."""
    cfg, _, _ = read_checkpoint_meta(ckpt)
    shard = shard_for(ckpt, Config(model=cfg), tp, pp, tp_rank, pp_rank)
    return {name: shard[name] for name in shard}

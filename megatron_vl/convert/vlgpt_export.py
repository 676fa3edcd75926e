"""A VL-GPT training checkpoint -> a Hugging Face directory.

Layout written (atomically: a temporary sibling renamed when complete)::

    OUT/config.json, model*.safetensors     LlamaForCausalLM: the language model, vocabulary
                                            with [IMG]/[/IMG] (their trained LoRA row deltas
                                            folded into the embedding and LM-head rows)
    OUT/tokenizer.json, tokenizer_config.json ...   the training tokenizer + [IMG]/[/IMG]
    OUT/adapter/                            the LoRA adapter in peft's format (LoRA runs,
                                            unless --merge-lora folded it into the weights)
    OUT/vlgpt_config.json                   visual width, image token ids, where the rest is
    OUT/vlgpt_heads.safetensors             visual projection and regression head
    OUT/image_tokenizer/                    the image tokenizer (when given)
    OUT/image_detokenizer/                  the image detokenizer (when given: images out)

``megatron_vl.inference.modeling_vlgpt.VLGPTForCausalLM.from_pretrained(OUT)`` puts it back together.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from safetensors.torch import save_file

from ..data.tokenizer import IMG, IMG_END, add_image_tokens
from ..model.lora import HF_PROJ
from ..inference.export_layout import (ADAPTER_DIR, FORMAT_VERSION, HEADS, IMAGE_DETOKENIZER_DIR, IMAGE_TOKENIZER_DIR,
                                       VLGPT_CONFIG, VLGPT_HEADS)
from ..checkpoint.output_dir import check_output_dir
from ..checkpoint.release import shards_to_hf
from ..checkpoint.layout import CheckpointError
from ..checkpoint.output_dir import atomic_directory
from .hf import hf_config_from_model, write_hf_files
from ..checkpoint.merged import _MODULE_OF, _ROW_PARTS
from ..checkpoint.training_reader import TrainedWeights, read_training_checkpoint


@dataclass
class ExportSummary:
    tensors: int
    lora: str            # "none" | "adapter" | "merged"
    image_tokenizer: bool
    iteration: int


def _lora_full(w: TrainedWeights, layer: int, part: str):
    """(A [r, in], B [out, r]) of one projection, TP slices joined; None when untrained."""
    key = f"layers.{layer}.{_MODULE_OF[part]}"
    ranks = w.per_tp_rank
    if f"{key}.lora_A.{part}" not in ranks[0]:
        return None
    a = [r[f"{key}.lora_A.{part}"] for r in ranks]
    b = [r[f"{key}.lora_B.{part}"] for r in ranks]
    if part in _ROW_PARTS:      # row-parallel: A split over the input, B replicated
        return torch.cat(a, dim=1), b[0]
    return a[0], torch.cat(b, dim=0)   # column-parallel: A replicated, B split over the output


def _image_token_ids(w: TrainedWeights) -> List[int]:
    ids = w.client.get("image_token_ids")
    if ids is None:
        raise CheckpointError(f"{w.path}: the client state has no image_token_ids (written before they were "
                              "recorded); re-save it with this version of pretrain_vlgpt.py")
    return [int(i) for i in ids]


def _hf_tokenizer(meta: dict, override: Optional[str], ids: List[int]):
    """The training tokenizer as a transformers tokenizer with [IMG]/[/IMG] at the ids the
    data used; None when the tokenizer files are not here."""
    from transformers import AutoTokenizer, LlamaTokenizer
    kind, model = meta.get("type"), override or meta.get("model")
    if not model or not os.path.exists(model):
        return None
    if kind == "sentencepiece" or (override and os.path.isfile(override)):
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(model, os.path.join(d, "tokenizer.model"))
            tok = LlamaTokenizer.from_pretrained(d)
    else:
        tok = AutoTokenizer.from_pretrained(model)
    got = add_image_tokens(tok)
    if list(got) != ids:
        raise CheckpointError(f"{model}: [IMG]/[/IMG] get ids {got} in the HF tokenizer but the training data used "
                              f"{ids}: not the tokenizer the data was preprocessed with")
    return tok


def _part_config(flag: str, path: str, kind: str):
    """The config of the part directory `path` given to `flag`, which must be of that kind
    (the other part's directory, a CLIP folder or a damaged one are refused, naming it)."""
    from ..model import image_detokenizer as detok, image_tokenizer as tok
    from ..model.directory import PartDirectoryError, read_part_config
    module = tok if kind == "image tokenizer" else detok
    cfg_type = tok.ImageTokenizerConfig if module is tok else detok.ImageDetokenizerConfig
    try:
        cfg = read_part_config(path, module.CONFIG_NAME, cfg_type, kind)
    except PartDirectoryError as exc:
        raise CheckpointError(f"{flag} {exc}") from None
    if module is tok and not os.path.isfile(os.path.join(path, "clip", "config.json")):
        raise CheckpointError(f"{flag} {path}: an image tokenizer directory without its CLIP tower (clip/config.json)")
    return cfg


def check_parts(cfg, image_tokenizer: Optional[str], image_detokenizer: Optional[str]) -> None:
    """The image tokenizer and detokenizer shipped with an export are what their flags say,
    and fit the model (cfg; None: the kinds only): visual width d, and N for the tokenizer."""
    parts = [("--image-tokenizer", image_tokenizer, "image tokenizer"),
             ("--image-detokenizer", image_detokenizer, "image detokenizer")]
    for flag, path, kind in parts:
        if not path:
            continue
        part = _part_config(flag, path, kind)
        if cfg is None:
            continue
        width = part.embed_dim
        verb = "gives" if kind == "image tokenizer" else "reads"
        if width != cfg.model.visual_embed_dim:
            raise CheckpointError(f"{flag} {path} {verb} visual embeddings of width {width}, the model's are "
                                  f"{cfg.model.visual_embed_dim}")
        if kind == "image tokenizer" and part.num_tokens != cfg.data.num_image_tokens:
            raise CheckpointError(f"{flag} {path} gives {part.num_tokens} visual embeddings per image, the model "
                                  f"was trained with {cfg.data.num_image_tokens} (--num-image-tokens)")


def export_vlgpt(load: str, save: str, merge_lora: bool = False, image_tokenizer: Optional[str] = None,
                 tokenizer_model: Optional[str] = None, iteration: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, log=print,
                 image_detokenizer: Optional[str] = None) -> ExportSummary:
    sources = (load, image_tokenizer, tokenizer_model, image_detokenizer)
    check_output_dir(save, "vlgpt-export", sources)   # before any reading: refuse early
    check_parts(None, image_tokenizer, image_detokenizer)   # each directory is the part it is named as
    w = read_training_checkpoint(load, iteration)
    cfg = w.cfg
    m, tp = cfg.model, len(w.per_tp_rank)
    ids = _image_token_ids(w)
    check_parts(cfg, image_tokenizer, image_detokenizer)
    base = {(r, 0): {k: v for k, v in sd.items() if k.startswith(("embedding.word_embeddings", "layers.", "head."))
                     and ".lora_" not in k and not k.endswith("rows_delta") and k not in HEADS}
            for r, sd in enumerate(w.per_tp_rank)}
    hf = shards_to_hf(base, m, tp, 1)
    first = w.per_tp_rank[0]
    # "As trained": the run's precision (ZeRO-3 keeps fp32 masters of what trains and
    # training-dtype copies of what is frozen; both go out in one dtype).
    t = cfg.training
    out_dtype = dtype or t.torch_dtype
    # Trained rows of [IMG]/[/IMG] (LoRA runs train them through deltas on frozen tables).
    for name, hf_name in (("embedding.rows_delta", "model.embed_tokens.weight"),
                          ("head.output.rows_delta", "lm_head.weight")):
        if name in first and hf_name in hf:
            table = hf[hf_name].float().clone()
            table[ids] += first[name].float()
            hf[hf_name] = table
    adapter: Dict[str, torch.Tensor] = {}
    targets = []
    for i in range(m.num_layers):
        for part in HF_PROJ:
            ab = _lora_full(w, i, part)
            if ab is None:
                continue
            a, b = ab
            targets.append(part)
            hf_name = f"model.layers.{i}.{HF_PROJ[part]}"
            if merge_lora:
                scale = cfg.lora.lora_alpha / cfg.lora.lora_rank
                hf[f"{hf_name}.weight"] = hf[f"{hf_name}.weight"].float() + scale * (b.float() @ a.float())
            else:
                adapter[f"base_model.model.{hf_name}.lora_A.weight"] = a.to(out_dtype).contiguous()
                adapter[f"base_model.model.{hf_name}.lora_B.weight"] = b.to(out_dtype).contiguous()
    lora = "none" if not targets else "merged" if merge_lora else "adapter"
    if merge_lora and not targets:
        raise CheckpointError(f"{w.path}: --merge-lora, but the run trained no LoRA adapter (--lora-rank 0)")
    hf = {k: v.to(out_dtype).contiguous() for k, v in hf.items()}
    missing = [k for k in HEADS if k not in first]
    if missing:
        raise CheckpointError(f"{w.path}: lacks {missing}: not a VL-GPT checkpoint")
    heads = {ours: first[k].to(out_dtype).contiguous() for k, ours in HEADS.items()}
    tok_meta = w.client.get("tokenizer") or {}
    tok = _hf_tokenizer(tok_meta, tokenizer_model, ids)
    if tok is None:
        raise CheckpointError(f"tokenizer {tokenizer_model or tok_meta.get('model')!r} not found (the export needs the "
                              "training tokenizer); pass --tokenizer-model with its .model file or HF directory")
    hf_config = hf_config_from_model(m, out_dtype, {"bos_token_id": tok.bos_token_id,
                                                    "eos_token_id": tok.eos_token_id})
    with atomic_directory(save, "vlgpt-export", sources) as tmp:
        write_hf_files(tmp, hf, hf_config)
        tok.save_pretrained(tmp)
        save_file(heads, os.path.join(tmp, VLGPT_HEADS), metadata={"format": "pt"})
        if lora == "adapter":
            from peft import LoraConfig
            os.makedirs(os.path.join(tmp, ADAPTER_DIR))
            LoraConfig(r=cfg.lora.lora_rank, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                       target_modules=sorted({HF_PROJ[p].split(".")[1] for p in targets}), bias="none",
                       task_type="CAUSAL_LM").save_pretrained(os.path.join(tmp, ADAPTER_DIR))
            save_file(adapter, os.path.join(tmp, ADAPTER_DIR, "adapter_model.safetensors"),
                      metadata={"format": "pt"})
        if image_tokenizer:
            shutil.copytree(image_tokenizer, os.path.join(tmp, IMAGE_TOKENIZER_DIR))
        if image_detokenizer:
            shutil.copytree(image_detokenizer, os.path.join(tmp, IMAGE_DETOKENIZER_DIR))
        meta = {"format": "megatron-vl-vlgpt", "version": FORMAT_VERSION,
                "visual_embed_dim": m.visual_embed_dim, "num_image_tokens": cfg.data.num_image_tokens,
                "image_token_ids": {IMG: ids[0], IMG_END: ids[1]},
                "visual_loss_weight": cfg.training.visual_loss_weight,
                "lora": {"state": lora, "adapter": ADAPTER_DIR if lora == "adapter" else None,
                         "rank": cfg.lora.lora_rank, "alpha": cfg.lora.lora_alpha},
                "image_tokenizer": IMAGE_TOKENIZER_DIR if image_tokenizer else None,
                "image_detokenizer": IMAGE_DETOKENIZER_DIR if image_detokenizer else None,
                "source": {"checkpoint": os.path.abspath(w.path), "iteration": w.iteration,
                           "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                           "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
                           "zero_stage": cfg.parallel.zero_stage}}
        with open(os.path.join(tmp, VLGPT_CONFIG), "w") as fh:
            json.dump(meta, fh, indent=2)
    if not image_tokenizer:
        log(f"note: no --image-tokenizer given; {save} holds no image tokenizer (visual inputs must come "
            "as precomputed embeddings)")
    return ExportSummary(len(hf), lora, bool(image_tokenizer), w.iteration)

"""The run's data: train/valid datasets from --data-path/--split, their loaders from the
consumed-sample count, and the model-ready batch."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, data_parallel_size, gradient_accumulation_steps
from ..data.dataset import (PackedDataset, PretrainingSampler, build_train_valid_test, collate, open_meta,
                            parse_blend, split_weights)
from ..data.indexed import FeatureStore
from ..data.preprocess import sidecar
from ..errors import UserError
from ..data.packing import packing_config
from ..data.tokenizer import IMG, IMG_END
from ..model.vlgpt import regression_targets, visual_inputs
from ..ops import documents_from_segments


@dataclass
class RunData:
    train: object
    valid: Optional[object]
    image_token_ids: tuple
    global_batch: int
    tokenizer: dict      # the datasets' tokenizer metadata (type, model, vocab_size, ids)


def _dataset_facts(cfg: Config):
    """(vocabulary size, [IMG]/[/IMG] ids, feature width, tokenizer metadata) agreed by every
    prefix of the blend."""
    prefixes, _ = parse_blend(cfg.data.data_path)
    vocab, ids, width, first = 0, None, None, None
    for prefix in prefixes:
        tok = open_meta(prefix)["tokenizer"]
        first = first or tok
        these = (tok["image_token_ids"][IMG], tok["image_token_ids"][IMG_END])
        if ids is not None and these != ids:
            raise ConfigError(f"{prefix}: [IMG]/[/IMG] ids {these} differ from the other datasets' {ids}; "
                              "preprocess every dataset with the same tokenizer")
        ids, vocab = these, max(vocab, tok["vocab_size"])
        store = sidecar(prefix, "features")
        if not os.path.isfile(store + ".idx"):
            continue   # text-only dataset, or features not extracted yet (the dataset says which)
        d = FeatureStore(store).shape[1]
        if width is not None and d != width:
            raise ConfigError(f"{store}: features of width {d}, other datasets have {width}")
        width = d
    return vocab, ids, width, first


def build_data(cfg: Config, world_size: int) -> RunData:
    """Every rank builds the datasets (index building synchronises over the default group)."""
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required (a preprocessed prefix, or weighted prefixes)")
    vocab, ids, width, tokenizer = _dataset_facts(cfg)
    m = cfg.model
    if vocab > m.vocab_size:
        raise ConfigError(f"the datasets' tokenizer has {vocab} tokens (with [IMG]/[/IMG]) but --vocab-size is "
                          f"{m.vocab_size}; set --vocab-size {vocab}")
    if width is not None and width != m.visual_embed_dim:
        raise ConfigError(f"the datasets' image features have width {width} but --visual-embed-dim is "
                          f"{m.visual_embed_dim}")
    dp = data_parallel_size(cfg, world_size)
    t = cfg.training
    gbs = t.micro_batch_size * gradient_accumulation_steps(cfg, world_size) * dp
    evals = t.train_iters // t.eval_interval + 1 if t.eval_iters > 0 else 0
    sizes = (t.train_iters * gbs, evals * t.eval_iters * gbs, 0)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if split_weights(cfg.data.split)[1] <= 0:
        sizes = (sizes[0], 0, 0)
        if evals and t.eval_interval <= t.train_iters and rank0:
            # Megatron's behaviour (no validation set, no evaluation), said once.
            print(f"note: --split {cfg.data.split} leaves no validation documents: no evaluation every "
                  f"--eval-interval {t.eval_interval} (give the second --split weight a share to evaluate)",
                  flush=True)
    pack = replace(packing_config(cfg), embed_dim=m.visual_embed_dim)
    train, valid, _ = build_train_valid_test(cfg.data.data_path, cfg.data.split, pack, sizes, cfg.data.data_cache_path)
    if rank0:
        for part in (train, valid):
            for ds in getattr(part, "datasets", []):
                for note in getattr(ds, "notes", []) if isinstance(ds, PackedDataset) else []:
                    print(f"note: {note}", flush=True)
    return RunData(train, valid, ids, gbs, tokenizer)


def _one_line(exc: UserError) -> UserError:
    """A user error raised in a loader worker arrives as 'Caught X in DataLoader worker
    process N.' plus the worker's traceback; the last line is the message itself."""
    text = str(exc)
    if not text.startswith("Caught "):
        return exc
    last = text.rstrip().splitlines()[-1]
    name = type(exc).__name__
    message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    try:
        return type(exc)(message)
    except TypeError:
        return exc


def _user_errors_in_one_line(batches: Iterator) -> Iterator:
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as exc:
            raise _one_line(exc) from None
        yield batch


def loader(dataset, cfg: Config, consumed: int, dp_rank: int, dp: int, total: Optional[int] = None) -> Iterator:
    sampler = PretrainingSampler(total if total is not None else len(dataset), consumed,
                                 cfg.training.micro_batch_size, dp_rank, dp)
    workers = cfg.data.num_workers
    # Pinned host memory: the non_blocking copies in model_batch then really overlap compute.
    return _user_errors_in_one_line(iter(DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, persistent_workers=False,
        prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())))


def model_batch(raw: Dict[str, torch.Tensor], cfg: Config, device, dtype) -> Dict[str, torch.Tensor]:
    """The packed sample batch -> the model's inputs and targets on `device`. Document
    boundaries for varlen attention are worked out here, on the host, once per batch."""
    docs = documents_from_segments(raw["segment_ids"]) if cfg.data.reset_attention_mask else None
    raw = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    visual = visual_inputs(raw["features"], raw["visual_slot"], raw["visual_index"])
    return {"tokens": raw["tokens"], "visual_embeds": visual.to(dtype), "visual_mask": raw["visual_mask"],
            "position_ids": raw["position_ids"],
            "segment_ids": raw["segment_ids"] if docs else None,
            "cu_seqlens": docs.cu_seqlens.to(device, non_blocking=True) if docs else None,
            "max_seqlen": docs.max_seqlen if docs else None,
            "labels": raw["labels"], "visual_targets": regression_targets(visual),
            "regression_mask": raw["regression_mask"]}

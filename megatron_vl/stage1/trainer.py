"""Stage 1 on the shared training loop: the image tokenizer-detokenizer trained from
webdataset pairs (train_tokenizer.py is its entry point).

Checkpoints are the engine's (DeepSpeed state, RNG, ``latest``) plus, in the client state,
each data-parallel rank's stream position; every checkpoint also holds the trained parts in
their own formats, ``image_tokenizer/`` and ``image_detokenizer/``, which
``tools/export_tokenizer.py`` copies out.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoint.layout import IMAGE_DETOKENIZER_DIR, IMAGE_TOKENIZER_DIR
from ..config import ConfigError, build_parser, effective_zero_stage, load_config
from ..data.formats import Report
from ..data.pair_stream import PairStream, parse_sources
from ..parallel.random import seed_everything
from ..training.build import make_engine
from ..checkpoint.layout import write_stage
from ..training.engine import Trainer, exit_code, run_training, start_process
from ..training.metrics import memory_gb
from ..training.preflight import guarded_save
from .config import TokenizerTrainConfig
from .data import PairBatches
from .framework import TokenizerFramework, build_framework, ip_image_encoder_dir
from .targets import TargetEncoders, TargetStore

STAGE = "tokenizer"   # stage.json of its checkpoints


class TokenizerTrainer(Trainer):
    loss_names = ("image", "text")

    def __init__(self, cfg: TokenizerTrainConfig, engine, framework: TokenizerFramework, pair_batches: PairBatches,
                 clip_processor, tracker, device, world: int):
        rank = dist.get_rank() if dist.is_initialized() else 0
        super().__init__(cfg, engine, device, world, cfg.training.global_batch_size or
                         cfg.training.micro_batch_size * world, tracker,
                         dist.group.WORLD if world > 1 else None, world, reporting=rank == 0)
        self.framework, self.pair_batches, self.clip_processor = framework, pair_batches, clip_processor
        self.position = 0                 # this rank's stream position after the last trained batch
        self.reported_skips = 0

    # --- data ---------------------------------------------------------------------------
    def batches(self, consumed: int):
        for batch in self.pair_batches(self.position):
            self.position = batch.pop("position")
            where = batch.pop("where")
            self.batch_digest = (self.batch_digest * 1_000_003 + zlib.crc32("|".join(where).encode())) % 2**61
            yield batch

    # --- checkpoints --------------------------------------------------------------------
    def extra_client_state(self) -> Dict:
        positions = [self.position]
        if dist.is_initialized() and self.world > 1:
            positions = [None] * self.world
            dist.all_gather_object(positions, self.position)
        return {"stream_positions": positions, "data_parallel_size": self.world}

    def restore_client_state(self, client: Dict) -> None:
        positions = client["stream_positions"]
        if len(positions) != self.world:
            raise ConfigError(f"--load {self.cfg.checkpoint.load}: written by {len(positions)} data-parallel ranks, "
                              f"resumed by {self.world}: each rank's webdataset stream (its shards, its shuffle "
                              f"buffer) continues exactly only under the same number of ranks")
        self.position = positions[self.rank]

    def write_export(self, tag_dir: str) -> None:
        """image_tokenizer/ and image_detokenizer/ in their own formats (ZeRO-3: gathered)."""
        import deepspeed
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                write_stage(tag_dir, STAGE)
                module.tokenizer.save_pretrained(os.path.join(tag_dir, IMAGE_TOKENIZER_DIR), self.clip_processor)
                module.detokenizer.save_pretrained(os.path.join(tag_dir, IMAGE_DETOKENIZER_DIR))

    # --- logging ------------------------------------------------------------------------
    def log_window(self, losses, lr, grad_norm, seconds_per_step, loss_scale) -> None:
        report = self.pair_batches.report
        skipped = sum(report.skipped.values())
        if skipped > self.reported_skips:   # every rank reads its own shards: each says what it passed over
            self.reported_skips = skipped
            self.log_all(f"rank {self.rank}: data skipped so far: " + "; ".join(
                f"{reason}: {n} (first at {report.first_seen[reason]})" for reason, n in sorted(report.skipped.items())))
        if not self.reporting:
            return
        t = self.cfg.training
        images_per_s = self.global_batch / seconds_per_step
        width = len(str(t.train_iters))
        parts = [f"iteration {self.iteration:>{width}}/{t.train_iters}", f"consumed samples: {self.consumed}",
                 f"image loss: {losses['image']:.8E}", f"text loss: {losses['text']:.8E}",
                 f"learning rate: {lr:.6E}",
                 f"grad norm: {grad_norm:.4f}" if grad_norm is not None else "grad norm: n/a",
                 f"skipped: {self.skipped_total}"]
        if loss_scale is not None:
            parts.append(f"loss scale: {loss_scale:.1f}")
        parts += [f"step time: {seconds_per_step * 1000:.1f} ms", f"images/s: {images_per_s:.2f}",
                  f"mem: {memory_gb():.2f} GB"]
        print(" | ".join(parts), flush=True)
        self.sinks.scalars({"train/image_loss": losses["image"], "train/text_loss": losses["text"], "train/lr": lr,
                            "train/grad_norm": grad_norm or float("nan"), "train/skipped_total": self.skipped_total,
                            "perf/images_per_s": images_per_s, "perf/memory_gb": memory_gb()}, self.iteration)


def parser(description: str = "Stage 1: train the VL-GPT image tokenizer-detokenizer (DeepSpeed)."):
    return build_parser(description, config_cls=TokenizerTrainConfig)


def train_tokenizer(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> TokenizerTrainer:
    """Runs a whole stage-1 job; returns the trainer (exit_code, history)."""
    cfg, _ = load_config(argv, parser=parser(description) if description else parser(),
                         config_cls=TokenizerTrainConfig)
    launch, device, owns_group = start_process(cfg, lambda world: (cfg.validate(world), check_inputs(cfg)))
    with guarded_save(cfg, STAGE, launch.rank):
        return _train_tokenizer(cfg, launch, device, owns_group)


def check_inputs(cfg: TokenizerTrainConfig) -> None:
    """What the run reads, before it builds anything (loading CLIP, SD and DeepSpeed takes a
    while): a missing model directory or shard is one line naming it, exit 1."""
    from ..errors import InputError
    from .data import check_shards
    m = cfg.model
    missing = [f"{flag} {path}: no such directory" for flag, path in
               (("--clip-model", m.clip_model), ("--sd-model", m.sd_model), ("--ip-adapter", m.ip_adapter))
               if path and not os.path.isdir(path)]
    if missing:
        raise InputError("; ".join(missing))
    check_shards(parse_sources(cfg.data.train_shards)[0])


def _train_tokenizer(cfg: TokenizerTrainConfig, launch, device, owns_group: bool) -> TokenizerTrainer:
    from ..console import clip_image_processor_class
    from ..model.directory import load_pretrained
    world, rank, m, t = launch.world_size, launch.rank, cfg.model, cfg.training
    tracker = seed_everything(t.seed, device=device.type)
    try:
        framework = build_framework(m, t.seed)
        processor = load_pretrained(clip_image_processor_class(), m.clip_model,
                                    "CLIP image processor (--clip-model)")
        sources, weights = parse_sources(cfg.data.train_shards)
        stream = PairStream(sources, weights, rank, world, t.seed, cfg.data.shuffle_buffer, Report())
        encoder_dir = ip_image_encoder_dir(m.ip_adapter)
        if cfg.data.targets_dir:
            d = framework.detokenizer.cfg
            store = TargetStore(cfg.data.targets_dir, (d.image_cond_tokens, d.image_cond_dim),
                                (d.text_cond_tokens, d.text_cond_dim),
                                {"image_encoder": os.path.abspath(encoder_dir), "sd_model": os.path.abspath(m.sd_model)},
                                log=print if rank == 0 else (lambda msg: None))
            encoders = None
        else:
            store, encoders = None, TargetEncoders(encoder_dir, m.sd_model, device)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    framework.to(device)
    dtype = t.torch_dtype
    batches = PairBatches(stream, t.micro_batch_size, processor, encoders, store, device, dtype, cfg.data.prefetch)
    engine, _ = make_engine(cfg, framework, world)
    trainer = TokenizerTrainer(cfg, engine, framework, batches, processor, tracker, device, world)
    trainable = sum(p.numel() for p in framework.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in framework.parameters() if not p.requires_grad)
    trainer.log(f"stage 1: world {world} (data parallel), ZeRO-{effective_zero_stage(cfg)}, "
                f"{t.precision}, global batch {trainer.global_batch} "
                f"(micro {t.micro_batch_size} x accumulation {trainer.gas} x dp {world}); targets "
                f"{'from ' + cfg.data.targets_dir if store else 'computed on the fly'}; parameters: {trainable:,} "
                f"trainable, {frozen:,} frozen (CLIP); λ image {m.lambda_image}, λ text {m.lambda_text}")
    run_training(trainer, owns_group)
    report = stream.report
    if report.skipped:
        print(f"rank {rank}: data skipped: " + "; ".join(f"{r}: {n} (first at {report.first_seen[r]})"
                                                        for r, n in sorted(report.skipped.items())), flush=True)
    return trainer


def run(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    return exit_code(lambda: train_tokenizer(argv, description))

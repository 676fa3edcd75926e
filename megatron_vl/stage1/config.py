"""Stage 1's configuration: the same declaration system as pretraining (one dataclass field
per setting; flag, YAML key and DeepSpeed JSON derived from it), with stage 1's own model and
data sections. Optimizer, training, checkpoint and logging sections are pretraining's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import (CheckpointConfig, ConfigError, DataParallelConfig, LoggingConfig, LoopConfig,
                      OptimizerConfig, Sections, opt, raise_errors, training_errors)


@dataclass
class TokenizerModelConfig:
    clip_model: Optional[str] = opt(
        None, "The CLIP vision tower the tokenizer reads (local transformers directory, e.g. CLIP ViT-L/14, "
        "with its preprocessor_config.json).")
    clip_layer: str = opt("last", "The CLIP hidden state the tokenizer reads.", choices=["last", "penultimate"])
    num_image_tokens: int = opt(32, "N: visual embeddings per image.")
    visual_embed_dim: int = opt(4096, "d: width of each visual embedding (the LM's hidden size in VL-GPT).")
    tokenizer_layers: int = opt(2, "Depth of the tokenizer's causal transformer.")
    tokenizer_heads: int = opt(8, "Attention heads of the tokenizer's transformer (must divide the CLIP width).")
    detokenizer_width: int = opt(1024, "Width of the detokenizer's transformer decoder.")
    detokenizer_layers: int = opt(4, "Depth of the detokenizer's transformer decoder.")
    detokenizer_heads: int = opt(16, "Attention heads of the detokenizer (must divide its width).")
    sd_model: Optional[str] = opt(
        None, "Stable Diffusion 1.5 directory (diffusers layout): its text_encoder/ + tokenizer/ give the text "
        "targets e_t; UNet and VAE are not loaded for training.")
    ip_adapter: Optional[str] = opt(
        None, "IP-Adapter-Plus directory: the adapter weights (--ip-adapter-weight) and image_encoder/ (the ViT-H "
        "CLIPVisionModelWithProjection whose hidden_states[-2] are the image targets e_v).")
    ip_adapter_weight: str = opt("ip-adapter-plus_sd15.bin",
                                 "File name of the IP-Adapter-Plus weights inside --ip-adapter (.bin or .safetensors).")
    lambda_image: float = opt(1.0, "λ1: weight of MSE(z_v, e_v); 0 trains the text condition only.")
    lambda_text: float = opt(1.0, "λ2: weight of MSE(z_t, e_t); 0 trains the image condition only.")


@dataclass
class PairDataConfig:
    train_shards: List[str] = opt(
        help="img2dataset webdataset shards, brace patterns, optionally weighted like --data-path: "
        "'cc3m/{00000..00331}.tar' or '0.5 cc3m/{00000..00331}.tar 0.5 laion/{00000..09999}.tar'.",
        factory=list)
    shuffle_buffer: int = opt(1000, "Samples in each rank's shuffle buffer.")
    targets_dir: Optional[str] = opt(
        None, "Precomputed float16 targets (tools/precompute_tokenizer_targets.py); default: computed on the fly "
        "by the frozen encoders. Both paths give equal losses.")
    prefetch: int = opt(2, "Micro-batches decoded ahead by a background thread.")


@dataclass
class TokenizerTrainConfig(Sections):
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int) -> None:
        m, d = self.model, self.data
        errors = []
        for flag, value in (("--clip-model", m.clip_model), ("--sd-model", m.sd_model), ("--ip-adapter", m.ip_adapter)):
            if not value:
                errors.append(f"{flag} is required (a local directory; nothing is downloaded)")
        if not d.train_shards:
            errors.append("--train-shards is required")
        if m.lambda_image < 0 or m.lambda_text < 0:
            errors.append("--lambda-image and --lambda-text must be >= 0")
        elif m.lambda_image == 0 and m.lambda_text == 0:
            errors.append("--lambda-image and --lambda-text are both 0: nothing to train")
        errors += size_errors(self)
        errors += ip_adapter_weight_errors(m)
        errors += training_errors(self, world_size)
        raise_errors(errors)


# Sizes that must be at least 1 (a 0-wide or 0-deep part trains nothing), and at least 0.
POSITIVE = {"model": ("num_image_tokens", "visual_embed_dim", "tokenizer_layers", "tokenizer_heads",
                      "detokenizer_width", "detokenizer_layers", "detokenizer_heads"),
            "data": ("shuffle_buffer",)}
NON_NEGATIVE = {"data": ("prefetch",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def size_errors(cfg: "TokenizerTrainConfig") -> List[str]:
    """Every width, depth and count of the stage-1 model and data: in range, and the heads
    dividing the width they split (the CLIP width is checked when CLIP is loaded)."""
    import math
    errors = []
    for section, names in POSITIVE.items():
        for name in names:
            value = getattr(getattr(cfg, section), name)
            if value < 1:
                errors.append(f"{_flag(name)} {value}: must be at least 1")
    for section, names in NON_NEGATIVE.items():
        for name in names:
            value = getattr(getattr(cfg, section), name)
            if value < 0:
                errors.append(f"{_flag(name)} {value}: must be at least 0")
    m = cfg.model
    if m.detokenizer_width >= 1 and m.detokenizer_heads >= 1 and m.detokenizer_width % m.detokenizer_heads:
        errors.append(f"--detokenizer-heads {m.detokenizer_heads} does not divide --detokenizer-width "
                      f"{m.detokenizer_width}")
    for flag, value in (("--lambda-image", m.lambda_image), ("--lambda-text", m.lambda_text)):
        if not math.isfinite(value):
            errors.append(f"{flag} {value}: must be a finite number")
    return errors


def ip_adapter_weight_errors(m: TokenizerModelConfig) -> List[str]:
    """The adapter weights are only read when decoding, long after training: a wrong name must
    be refused now, not recorded in the detokenizer for the decoder to trip over."""
    import os
    if not m.ip_adapter or not os.path.isdir(m.ip_adapter):
        return []   # reported as a missing directory when the models are built
    if os.path.basename(m.ip_adapter_weight) != m.ip_adapter_weight:
        return [f"--ip-adapter-weight {m.ip_adapter_weight}: a file name inside --ip-adapter, not a path"]
    if os.path.isfile(os.path.join(m.ip_adapter, m.ip_adapter_weight)):
        return []
    present = sorted(f for f in os.listdir(m.ip_adapter) if f.endswith((".bin", ".safetensors")))
    return [f"--ip-adapter-weight {m.ip_adapter_weight}: no such file in --ip-adapter {m.ip_adapter} (weight files "
            f"there: {', '.join(present) or 'none'})"]


__all__ = ["TokenizerTrainConfig", "TokenizerModelConfig", "PairDataConfig", "ConfigError"]

"""The image tokenizer (architecture only): a frozen CLIP vision tower followed by a causal
transformer that reads the patch features and N learned queries and emits N visual
embeddings of width d. Saved as a directory: ``config.json`` + ``model.safetensors`` (our
weights) + ``clip/`` (the vision tower, transformers format) + the image processor config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .directory import PartDirectoryError, load_part_weights, load_pretrained, read_part_config, save_part

CONFIG_NAME = "image_tokenizer_config.json"


@dataclass
class ImageTokenizerConfig:
    num_tokens: int = 32
    """N: visual embeddings per image."""
    embed_dim: int = 4096
    """d: width of each visual embedding (the LM's visual input / regression target)."""
    num_layers: int = 2
    """Depth of the causal transformer after CLIP."""
    num_heads: int = 8
    """Attention heads of that transformer (must divide the CLIP width)."""
    clip_layer: str = "last"
    """Which CLIP hidden state the transformer reads: 'last' or 'penultimate'."""


class ImageTokenizer(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig, clip):
        super().__init__()
        self.cfg = cfg
        self.clip = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        if cfg.clip_layer not in ("last", "penultimate"):
            raise ValueError(f"clip_layer {cfg.clip_layer!r}: expected 'last' or 'penultimate'")
        width = clip.config.hidden_size
        if width % cfg.num_heads:
            raise ValueError(f"CLIP width {width} is not divisible by num_heads {cfg.num_heads}")
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, cfg.num_heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] -> [b, N, d]."""
        with torch.no_grad():
            if self.cfg.clip_layer == "penultimate":
                patches = self.clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
            else:
                patches = self.clip(pixel_values=pixel_values).last_hidden_state
        b = patches.shape[0]
        x = torch.cat([patches.to(self.queries.dtype), self.queries.unsqueeze(0).expand(b, -1, -1)], dim=1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        out = self.transformer(x, mask=mask, is_causal=True)[:, -self.cfg.num_tokens:]
        return self.proj(self.norm(out))

    # --- directory format -------------------------------------------------------------

    def own_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def save_pretrained(self, path: str, image_processor=None) -> None:
        self.clip.save_pretrained(os.path.join(path, "clip"))
        if image_processor is not None:
            image_processor.save_pretrained(os.path.join(path, "clip"))
        save_part(path, CONFIG_NAME, self.cfg, self.own_state_dict())

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageTokenizer":
        from transformers import CLIPVisionModel
        cfg = read_part_config(path, CONFIG_NAME, ImageTokenizerConfig, "image tokenizer")
        clip = load_pretrained(CLIPVisionModel, os.path.join(path, "clip"), "CLIP vision tower (clip/ of the image tokenizer)")
        try:
            model = cls(cfg, clip)
        except ValueError as exc:   # a config that cannot be built (heads, clip_layer)
            raise PartDirectoryError(f"{os.path.join(path, CONFIG_NAME)}: {exc}") from None
        load_part_weights(model, path, external=("clip.",))
        return model

    @classmethod
    def from_clip(cls, clip_dir: str, cfg: ImageTokenizerConfig, seed: int = 0) -> "ImageTokenizer":
        """An untrained tokenizer on a CLIP vision tower (before stage-1 training exists)."""
        from transformers import CLIPVisionModel
        clip = load_pretrained(CLIPVisionModel, clip_dir, "CLIP vision tower")
        torch.manual_seed(seed)
        return cls(cfg, clip)


def load_image_processor(path: str):
    """The CLIP image processor saved beside the vision tower (path or path/clip)."""
    from ..console import clip_image_processor_class
    for d in (os.path.join(path, "clip"), path):
        if os.path.isfile(os.path.join(d, "preprocessor_config.json")):
            return load_pretrained(clip_image_processor_class(), d, "CLIP image processor")
    raise PartDirectoryError(f"{path}: no preprocessor_config.json (save the CLIP image processor with the model)")

"""The image detokenizer (architecture only): a transformer decoder that turns the N visual
embeddings x_v [N, d] of the image tokenizer into the two conditions of the diffusion
decoder (VL-GPT §3.1): z_v, shaped like IP-Adapter-Plus's image condition (the ViT-H image
encoder's ``hidden_states[-2]``: 257 x 1280 for SD 1.5's adapter), and z_t, shaped like SD
1.5's text condition (its CLIP text encoder's output: 77 x 768).

Learned queries, one per condition position, self-attend and cross-attend to x_v (projected
to the decoder width); each output position is projected to its condition's width. The
condition shapes are fields of the config, read from the local model directories
(``condition_shapes``), so tiny test models and the real ones go the same way.

Saved as a directory: ``image_detokenizer_config.json`` (with the names of the SD and
IP-Adapter directories it decodes with) + ``model.safetensors``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .directory import PartDirectoryError, load_part_weights, read_part_config, save_part

CONFIG_NAME = "image_detokenizer_config.json"


@dataclass
class ImageDetokenizerConfig:
    embed_dim: int = 4096
    """d: width of the visual embeddings it reads (the image tokenizer's output)."""
    image_cond_tokens: int = 257
    """Positions of z_v (the IP-Adapter image encoder's patches + CLS)."""
    image_cond_dim: int = 1280
    """Width of z_v (the IP-Adapter image encoder's hidden size)."""
    text_cond_tokens: int = 77
    """Positions of z_t (the SD tokenizer's model_max_length)."""
    text_cond_dim: int = 768
    """Width of z_t (the SD text encoder's hidden size)."""
    width: int = 1024
    """Decoder width."""
    num_layers: int = 4
    """Decoder depth (not published; ours)."""
    num_heads: int = 16
    """Decoder attention heads (must divide width)."""
    sd_dir: Optional[str] = None
    """The Stable Diffusion 1.5 directory (diffusers layout) it decodes with, for the record."""
    ip_adapter_dir: Optional[str] = None
    """The IP-Adapter-Plus directory (weights + image_encoder/) it decodes with, for the record."""
    ip_adapter_weight: str = "ip-adapter-plus_sd15.bin"
    """The IP-Adapter-Plus weights file inside ip_adapter_dir (.bin or .safetensors)."""


class ImageDetokenizer(nn.Module):
    def __init__(self, cfg: ImageDetokenizerConfig):
        super().__init__()
        if cfg.width % cfg.num_heads:
            raise ValueError(f"detokenizer width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.embed_dim, cfg.width)
        self.queries = nn.Parameter(torch.randn(cfg.image_cond_tokens + cfg.text_cond_tokens, cfg.width) * 0.02)
        layer = nn.TransformerDecoderLayer(cfg.width, cfg.num_heads, 4 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, cfg.num_layers)
        self.norm = nn.LayerNorm(cfg.width)
        self.image_head = nn.Linear(cfg.width, cfg.image_cond_dim)
        self.text_head = nn.Linear(cfg.width, cfg.text_cond_dim)

    def forward(self, visual_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_v [b, N, d] -> (z_v [b, image_cond_tokens, image_cond_dim],
        z_t [b, text_cond_tokens, text_cond_dim])."""
        memory = self.input_proj(visual_embeds.to(self.input_proj.weight.dtype))
        queries = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        out = self.norm(self.decoder(queries, memory))
        n = self.cfg.image_cond_tokens
        return self.image_head(out[:, :n]), self.text_head(out[:, n:])

    # --- directory format -------------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        save_part(path, CONFIG_NAME, self.cfg, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageDetokenizer":
        cfg = read_part_config(path, CONFIG_NAME, ImageDetokenizerConfig, "image detokenizer")
        try:
            model = cls(cfg)
        except ValueError as exc:   # a config that cannot be built (heads not dividing the width)
            raise PartDirectoryError(f"{os.path.join(path, CONFIG_NAME)}: {exc}") from None
        load_part_weights(model, path)
        return model


def detokenizer_loss(z_v: torch.Tensor, z_t: torch.Tensor, e_v: torch.Tensor, e_t: torch.Tensor,
                     lambda_image: float = 1.0, lambda_text: float = 1.0):
    """(λ1·MSE(z_v, e_v) + λ2·MSE(z_t, e_t), MSE image, MSE text), in fp32. A term whose λ
    is 0 is left out of the graph, so its head gets no gradient (the paper's ablation)."""
    if lambda_image == 0 and lambda_text == 0:
        raise ValueError("--lambda-image and --lambda-text are both 0: nothing to train")
    image = torch.nn.functional.mse_loss(z_v.float(), e_v.float())
    text = torch.nn.functional.mse_loss(z_t.float(), e_t.float())
    total = 0.0
    if lambda_image:
        total = total + lambda_image * image
    if lambda_text:
        total = total + lambda_text * text
    return total, image.detach(), text.detach()

"""What stage 1 trains: the image tokenizer (frozen CLIP + trainable causal transformer) and
the image detokenizer, joined by the λ-weighted condition loss (VL-GPT §3.1). The frozen
target encoders are not part of it: their outputs arrive in the batch."""

from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

from ..model.detokenizer_targets import condition_shapes
from ..model.directory import load_pretrained
from ..model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig, detokenizer_loss
from ..model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from .config import TokenizerModelConfig


class TokenizerFramework(nn.Module):
    def __init__(self, tokenizer: ImageTokenizer, detokenizer: ImageDetokenizer, lambda_image: float,
                 lambda_text: float):
        super().__init__()
        self.tokenizer, self.detokenizer = tokenizer, detokenizer
        self.lambda_image, self.lambda_text = lambda_image, lambda_text

    def forward(self, batch: Dict[str, torch.Tensor]):
        """batch: pixels (the CLIP processor's), image_targets e_v, text_targets e_t ->
        (total, MSE image, MSE text)."""
        z_v, z_t = self.detokenizer(self.tokenizer(batch["pixels"]))
        return detokenizer_loss(z_v, z_t, batch["image_targets"], batch["text_targets"],
                                self.lambda_image, self.lambda_text)


def ip_image_encoder_dir(ip_adapter_dir: str) -> str:
    return os.path.join(ip_adapter_dir, "image_encoder")


def build_framework(m: TokenizerModelConfig, seed: int) -> TokenizerFramework:
    """Fresh trainable parts on the local CLIP tower; condition shapes from the local SD and
    IP-Adapter directories' configs."""
    from transformers import CLIPVisionModel
    for flag, path in (("--clip-model", m.clip_model), ("--sd-model", m.sd_model), ("--ip-adapter", m.ip_adapter)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path}: no such directory")
    image_tokens, image_dim, text_tokens, text_dim = condition_shapes(ip_image_encoder_dir(m.ip_adapter), m.sd_model)
    torch.manual_seed(seed)
    tokenizer = ImageTokenizer(ImageTokenizerConfig(m.num_image_tokens, m.visual_embed_dim, m.tokenizer_layers,
                                                    m.tokenizer_heads, m.clip_layer),
                               load_pretrained(CLIPVisionModel, m.clip_model, "CLIP vision tower (--clip-model)"))
    detokenizer = ImageDetokenizer(ImageDetokenizerConfig(
        m.visual_embed_dim, image_tokens, image_dim, text_tokens, text_dim, m.detokenizer_width, m.detokenizer_layers,
        m.detokenizer_heads, sd_dir=os.path.abspath(m.sd_model), ip_adapter_dir=os.path.abspath(m.ip_adapter),
        ip_adapter_weight=m.ip_adapter_weight))
    # A condition whose λ is 0 (the paper's ablation) leaves its head out of the optimizer:
    # no gradient reaches it, and weight decay must not move it either.
    for weight, head in ((m.lambda_image, detokenizer.image_head), (m.lambda_text, detokenizer.text_head)):
        if weight == 0:
            head.requires_grad_(False)
    return TokenizerFramework(tokenizer, detokenizer, m.lambda_image, m.lambda_text)

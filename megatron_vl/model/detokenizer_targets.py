"""The frozen encoders that give stage 1 its regression targets, loaded from local
directories (nothing is downloaded):

- e_v: IP-Adapter-Plus's image condition, ``CLIPVisionModelWithProjection(pixels,
  output_hidden_states=True).hidden_states[-2]`` with its ``CLIPImageProcessor`` (the ViT-H
  encoder shipped beside the adapter, e.g. ``IP-Adapter/models/image_encoder``);
- e_t: SD 1.5's text condition, the ``text_encoder`` (``CLIPTextModel``) output for the
  caption tokenized by SD's ``tokenizer`` padded to its ``model_max_length`` (77).

Neither is ever trained: both are put in eval mode with ``requires_grad=False``.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
from torch import nn

from .directory import PartDirectoryError, load_pretrained


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ImageConditionEncoder(nn.Module):
    """e_v from images (PIL): the penultimate hidden state of the IP-Adapter image encoder."""

    def __init__(self, encoder_dir: str):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection
        from ..console import clip_image_processor_class
        if not os.path.isdir(encoder_dir):
            raise PartDirectoryError(f"IP-Adapter image encoder {encoder_dir}: no such directory")
        what = "IP-Adapter image encoder"
        self.encoder = _frozen(load_pretrained(CLIPVisionModelWithProjection, encoder_dir, what))
        self.processor = load_pretrained(clip_image_processor_class(), encoder_dir, f"{what}'s image processor")
        c = self.encoder.config
        self.shape = ((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def pixels(self, images: Sequence) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, 3, H, W] (this encoder's processor) -> [b, tokens, hidden]."""
        p = pixel_values.to(self.encoder.dtype)
        return self.encoder(pixel_values=p, output_hidden_states=True).hidden_states[-2]


class TextConditionEncoder(nn.Module):
    """e_t from captions: SD's text encoder on its tokenizer's max-length padding."""

    def __init__(self, sd_dir: str):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer
        for sub in ("text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(sd_dir, sub)):
                raise PartDirectoryError(f"Stable Diffusion directory {sd_dir}: no {sub}/ (the diffusers layout)")
        self.encoder = _frozen(load_pretrained(CLIPTextModel, os.path.join(sd_dir, "text_encoder"), "SD text encoder"))
        self.tokenizer = load_pretrained(CLIPTokenizer, os.path.join(sd_dir, "tokenizer"), "SD tokenizer")
        self.shape = (self.tokenizer.model_max_length, self.encoder.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def token_ids(self, captions: List[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.shape[0], truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, 77] -> [b, 77, hidden]: what StableDiffusionPipeline uses as prompt_embeds."""
        return self.encoder(input_ids=input_ids.to(self.encoder.device))[0]


def condition_shapes(encoder_dir: str, sd_dir: str):
    """(image_cond_tokens, image_cond_dim, text_cond_tokens, text_cond_dim) from the configs
    of the local directories, without loading weights."""
    from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
    v = load_pretrained(CLIPVisionConfig, encoder_dir, "IP-Adapter image encoder")
    t = load_pretrained(CLIPTextConfig, os.path.join(sd_dir, "text_encoder"), "SD text encoder")
    max_len = load_pretrained(CLIPTokenizer, os.path.join(sd_dir, "tokenizer"), "SD tokenizer").model_max_length
    return (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, max_len, t.hidden_size

"""Small random models in their real formats, for the quickstart and the tests (no downloads)."""

from __future__ import annotations


def save_tiny_clip(path: str, image_size: int = 32, width: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random transformers CLIPVisionModel plus its CLIPImageProcessor, saved to `path`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path

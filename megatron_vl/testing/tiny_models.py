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


def save_tiny_ip_image_encoder(path: str, image_size: int = 32, width: int = 48, layers: int = 3,
                               projection_dim: int = 16, seed: int = 1) -> str:
    """A random CLIPVisionModelWithProjection + CLIPImageProcessor: IP-Adapter-Plus's image
    encoder in miniature (its condition is hidden_states[-2]: 17 x 48 here, 257 x 1280 real)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


CLIP_TEXT_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def save_tiny_sd_text(sd_dir: str, width: int = 24, max_length: int = 77, seed: int = 2) -> str:
    """SD 1.5's text side in its diffusers layout (``text_encoder/`` CLIPTextModel,
    ``tokenizer/`` CLIPTokenizer), random and tiny; the BPE vocabulary is written by hand
    (single characters, no merges), so no tokenizer file is downloaded."""
    import json
    import os
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    tok_dir = os.path.join(sd_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    pieces = list(CLIP_TEXT_SYMBOLS) + [c + "</w>" for c in CLIP_TEXT_SYMBOLS] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tok_dir, "vocab.json"), "w") as fh:
        json.dump({p: i for i, p in enumerate(pieces)}, fh)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(tok_dir)
    cfg = CLIPTextConfig(vocab_size=len(pieces), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length,
                         bos_token_id=len(pieces) - 2, eos_token_id=len(pieces) - 1, pad_token_id=len(pieces) - 1)
    CLIPTextModel(cfg).save_pretrained(os.path.join(sd_dir, "text_encoder"))
    return sd_dir

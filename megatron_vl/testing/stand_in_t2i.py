"""Stand-ins for text-to-image evaluation without a model, shared by tests/test_eval_streaming.py
and benchmarks/bench_eval_memory.py: a generator with the runner's interface (prompt, generate,
decoder().decode, model.config, device) whose picture of a caption depends on the caption alone
(not on its batch or rank, so any split of the items draws the same pictures), a pooled-pixel
feature extractor for FID of any width, real image files and the items naming them."""

from __future__ import annotations

import os
import zlib
from types import SimpleNamespace
from typing import List

import numpy as np
import torch

DEFAULT_SIZE = 16


def caption_seed(caption: str) -> int:
    return zlib.crc32(caption.encode("utf-8"))


def caption_picture(caption: str, width: int, height: int):
    """The stand-in's picture of `caption`: a seeded colour with seeded noise, RGB PIL."""
    from PIL import Image
    rng = np.random.default_rng(caption_seed(caption))
    base = rng.integers(40, 216, size=3)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


class StandInDecoder:
    """decode(embeds, ...) as DiffusionDecoder's: embeds carry the caption's seed (row [0])."""

    def __init__(self, captions_by_seed):
        self.captions_by_seed = captions_by_seed

    def decode(self, embeds, mode="both", height=None, width=None, steps=1, guidance_scale=1.0, seed=0):
        return [caption_picture(self.captions_by_seed[int(row[0])], width or DEFAULT_SIZE, height or DEFAULT_SIZE)
                for row in embeds]


class StandInGenerator:
    """What eval.runner.text_to_image asks of inference.generation.Generator, and no model."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.model = SimpleNamespace(config={"num_image_tokens": 1})
        self._decoder = StandInDecoder({})

    def prompt(self, text: str, images=()):
        return text

    def generate(self, prompts, sampling):
        out = []
        for caption in prompts:
            self._decoder.captions_by_seed[caption_seed(caption)] = caption
            embeds = torch.tensor([[float(caption_seed(caption))]], dtype=torch.float64)
            out.append(SimpleNamespace(images=[embeds], stopped_by="image"))
        return out

    def decoder(self):
        return self._decoder


class PooledFeatures(torch.nn.Module):
    """uint8 [b, 3, H, W] -> [b, width]: 4x4 average-pooled pixels, projected by a fixed seeded
    matrix when `width` is given (a stand-in for Inception's 2048 features). Pooled per image in
    float32 (the same bits in any batch), projected in float64: an image's features do not
    depend on the batch it came in (float32 matmuls differ by batch shape at 1e-7), so the
    tests see the statistics' own rounding."""

    def __init__(self, width: int = 0, seed: int = 0):
        super().__init__()
        projection = (torch.randn(48, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                      / 48 ** 0.5
                      if width else None)
        self.register_buffer("projection", projection)

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1).double()
        return pooled if self.projection is None else pooled @ self.projection


def write_real_images(directory: str, count: int, size: int = DEFAULT_SIZE) -> List[str]:
    """`count` seeded noise PNGs (sizes vary around `size`: the runner resizes real images)."""
    from PIL import Image
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(count):
        side = size + int(rng.integers(0, 5))
        path = os.path.join(directory, f"real{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(side, side + 1, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def caption_items(image_paths: List[str], count: int):
    """`count` t2i items, each naming a caption and (cycling) one of the real images."""
    from ..eval.records import Item
    return [Item(i, image_paths[i % len(image_paths)], f"picture number {i}") for i in range(count)]

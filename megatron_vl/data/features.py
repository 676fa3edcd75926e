"""Feature extraction over a dataset's image table, in resumable shards."""

from __future__ import annotations

import io
import os
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .indexed import FeatureStore, FeatureStoreWriter, IndexedDataset, bin_path, idx_path
from .preprocess import sidecar


def _shard_prefix(prefix: str, shard: int) -> str:
    return f"{sidecar(prefix, 'features')}.shard{shard:05d}"


def _decode(data: np.ndarray):
    from PIL import Image
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.convert("RGB")


@torch.no_grad()
def extract_features(prefix: str, model, processor, batch_size: int = 64, shard_size: int = 4096,
                     device: str = "cpu", progress: Optional[Callable] = None) -> Tuple[int, Tuple[int, int]]:
    """Writes ``{prefix}_image_features`` (one [N, d] float16 block per image-table row).
    Finished shards survive an interruption and are not recomputed."""
    table = IndexedDataset(sidecar(prefix, "table"))
    total = len(table)
    shape = (model.cfg.num_tokens, model.cfg.embed_dim)
    shards = range(0, max(total, 1), shard_size) if total else []
    bar = progress(total=total, desc=f"features {os.path.basename(prefix)}", unit="img") if progress else None
    for shard, start in enumerate(shards):
        part = _shard_prefix(prefix, shard)
        end = min(start + shard_size, total)
        if os.path.isfile(idx_path(part)):
            try:
                if len(FeatureStore(part)) == end - start:
                    if bar:
                        bar.update(end - start)
                    continue
            except ValueError:
                pass  # damaged shard: recompute it
        writer = FeatureStoreWriter(part, *shape)
        for b in range(start, end, batch_size):
            images = [_decode(table[i]) for i in range(b, min(b + batch_size, end))]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            writer.add(model(pixels).float().cpu().numpy())
            if bar:
                bar.update(len(images))
        writer.finalize()
    if bar:
        bar.close()
    out = FeatureStoreWriter(sidecar(prefix, "features"), *shape)
    for shard in range(len(shards)):
        out.add(FeatureStore(_shard_prefix(prefix, shard)).features)
    out.finalize()
    for shard in range(len(shards)):
        for path in (bin_path(_shard_prefix(prefix, shard)), idx_path(_shard_prefix(prefix, shard))):
            os.remove(path)
    return total, shape

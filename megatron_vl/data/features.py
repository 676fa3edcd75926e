"""Feature extraction over a dataset's image table, in resumable shards.

The store (and each resumable shard) records the fingerprint of the image table it was
computed from: a shard left by a run over other data is recomputed, never reused. An image
that does not decode gets a zero block recorded as undecodable; the dataset reader drops
that image's block from every layout, and the run reports each such row with its document.
"""

from __future__ import annotations

import io
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..atomic import remove_stale_temps
from ..errors import UsageError

from .indexed import (FeatureStore, FeatureStoreWriter, IndexedDataError, IndexedDataset, bin_path, idx_path,
                      write_concatenated)
from .preprocess import prefix_lock, read_meta, sidecar, table_fingerprint


class ExtractionResult(NamedTuple):
    count: int
    shape: Tuple[int, int]
    undecodable: List[str]     # "table row R (document D): reason" for each image that did not decode


def _shard_prefix(prefix: str, shard: int) -> str:
    return f"{sidecar(prefix, 'features')}.shard{shard:05d}"


def _decode(data: np.ndarray):
    from PIL import Image
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.convert("RGB")


def image_documents(prefix: str, rows: np.ndarray) -> dict:
    """The document each image-table row belongs to (from the _images sidecar, whose
    document d is one flat sequence of (start, end, image) triples)."""
    spans = IndexedDataset(sidecar(prefix, "images"))
    image_ids = spans._bin[2::3]
    where = np.flatnonzero(np.isin(image_ids, rows))
    element = where * 3 + 2
    docs = np.searchsorted(spans.pointers // 8, element, side="right") - 1
    return dict(zip(image_ids[where].tolist(), docs.tolist()))


def _valid_shard(part: str, count: int, source: str) -> bool:
    if not os.path.isfile(idx_path(part)):
        return False
    try:
        FeatureStore(part, expected_count=count, source=source)
        return True
    except IndexedDataError:
        return False   # damaged, or from other data: recompute it


@torch.no_grad()
def extract_features(prefix: str, model, processor, batch_size: int = 64, shard_size: int = 4096,
                     device: str = "cpu", progress: Optional[Callable] = None) -> ExtractionResult:
    """Writes ``{prefix}_image_features`` (one [N, d] float16 block per image-table row).
    Finished shards survive an interruption and are not recomputed."""
    for name, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise UsageError(f"{name} {value}: must be a positive number of images")
    with prefix_lock(prefix):
        # A run killed mid-shard (kill -9, OOM) left its shard's temporary files: ours to clean.
        features = sidecar(prefix, "features")
        remove_stale_temps(os.path.dirname(features) or ".", prefix=os.path.basename(features) + ".")
        return _extract(prefix, model, processor, batch_size, shard_size, device, progress)


def _extract(prefix, model, processor, batch_size, shard_size, device, progress) -> ExtractionResult:
    source = table_fingerprint(prefix, read_meta(prefix))
    table = IndexedDataset(sidecar(prefix, "table"))
    total = len(table)
    shape = (model.cfg.num_tokens, model.cfg.embed_dim)
    shards = range(0, max(total, 1), shard_size) if total else []
    bar = progress(total=total, desc=f"features {os.path.basename(prefix)}", unit="img") if progress else None
    bad: dict = {}
    for shard, start in enumerate(shards):
        part = _shard_prefix(prefix, shard)
        end = min(start + shard_size, total)
        if _valid_shard(part, end - start, source):
            if bar:
                bar.update(end - start)
            continue
        writer = FeatureStoreWriter(part, *shape, source=source)
        try:
            for b in range(start, end, batch_size):
                decoded, images = [], []
                for i in range(b, min(b + batch_size, end)):
                    try:
                        images.append(_decode(table[i]))
                        decoded.append(True)
                    except Exception as exc:   # PIL raises OSError, ValueError, SyntaxError, ...
                        bad[i] = f"{type(exc).__name__}: {exc}"
                        decoded.append(False)
                feats = iter(model(processor(images=images, return_tensors="pt")["pixel_values"].to(device))
                             .float().cpu().numpy()) if images else iter(())
                for ok in decoded:   # table order: a zero block, recorded, where the image did not decode
                    if ok:
                        writer.add(next(feats))
                    else:
                        writer.add_bad()
                if bar:
                    bar.update(len(decoded))
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
    if bar:
        bar.close()
    write_concatenated(sidecar(prefix, "features"),
                       [FeatureStore(_shard_prefix(prefix, shard), source=source) for shard in range(len(shards))],
                       source)
    for shard in range(len(shards)):
        for path in (bin_path(_shard_prefix(prefix, shard)), idx_path(_shard_prefix(prefix, shard))):
            os.remove(path)
    rows = FeatureStore(sidecar(prefix, "features"), source=source).bad_rows
    docs = image_documents(prefix, rows) if len(rows) else {}
    reasons = [f"{sidecar(prefix, 'table')}.bin row {r} (document {docs.get(r, '?')}): "
               f"{bad.get(r, 'undecodable in an earlier run')}" for r in rows.tolist()]
    return ExtractionResult(total, shape, reasons)

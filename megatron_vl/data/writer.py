"""Writing one dataset prefix: its token file, image spans, image table and loss mask written
together under temporary names and renamed into place, then its metadata (layout.py)."""

from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from ..atomic import atomic_open, temp_name
from .indexed import IndexedDatasetWriter, optimal_token_dtype
from .layout import META_VERSION, sidecar
from .records import Report


def as_array(values):
    """A record's token ids (or loss mask) as an int64 array, None kept: made where the record
    is encoded, so a worker sends raw bytes back (a list of 500 ids unpickles in ~18 us, the
    array in ~2) and the writer casts it without a pass over Python ints."""
    return None if values is None else np.array(values, dtype=np.int64)


class DatasetWriter:
    """The four files of one dataset prefix, written together and renamed into place."""

    def __init__(self, prefix: str, tokenizer_meta: Dict, multimodal: bool, loss_mask: bool = False):
        self.prefix, self.meta, self.multimodal = prefix, tokenizer_meta, multimodal
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.tokens = IndexedDatasetWriter(prefix, optimal_token_dtype(tokenizer_meta["vocab_size"]), track_range=True)
        self.images = IndexedDatasetWriter(sidecar(prefix, "images"), np.int64) if multimodal else None
        self.table = IndexedDatasetWriter(sidecar(prefix, "table"), np.uint8) if multimodal else None
        self.loss_mask = IndexedDatasetWriter(sidecar(prefix, "loss_mask"), np.uint8) if loss_mask else None
        self.num_images = 0

    def add(self, tokens, images, mask=None) -> None:
        self.tokens.add_item(tokens)
        self.tokens.end_document()
        if self.loss_mask is not None:
            self.loss_mask.add_item(mask)
            self.loss_mask.end_document()
        if self.multimodal:
            triples = []
            for start, end, data in images:
                self.table.add_item(np.frombuffer(data, dtype=np.uint8))
                self.table.end_document()
                triples.extend((start, end, self.num_images))
                self.num_images += 1
            self.images.add_item(triples)
            self.images.end_document()

    def writers(self):
        return [w for w in (self.tokens, self.images, self.table, self.loss_mask) if w is not None]

    def finalize(self, report: Report, extra: Dict) -> None:
        for w in self.writers():
            w.finalize()
        names = {"tokens": self.tokens, "images": self.images, "table": self.table, "loss_mask": self.loss_mask}
        meta = {"version": META_VERSION, "multimodal": self.multimodal, "tokenizer": self.meta,
                "num_documents": len(self.tokens.document_indices) - 1, "num_images": self.num_images,
                "loss_mask": self.loss_mask is not None,
                "fingerprint": {k: w.fingerprint for k, w in names.items() if w is not None},
                "token_ids": {"min": self.tokens.smallest, "max": self.tokens.largest},
                "report": report.to_dict(), **extra}
        with atomic_open(sidecar(self.prefix, "meta")) as fh:
            json.dump(meta, fh, indent=2)

    def abort(self) -> None:
        """Removes every temporary file; never raises, so the error that led here is the one
        reported (on a full disk, closing a writer flushes its buffer and fails again)."""
        for w in self.writers():
            try:
                w.abort()
            except OSError:
                pass
            for path in (temp_name(w.prefix + ".bin"), temp_name(w.prefix + ".idx")):
                try:
                    os.remove(path)
                except OSError:
                    pass

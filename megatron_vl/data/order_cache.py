"""The sample-order caches of a packed dataset: three ``.npy`` arrays (document order, sample
starts, sample shuffle) under a name made from everything they depend on, and
``*_order.json``, written last, holding their CRC-32s. A missing, damaged, zeroed or
out-of-range cache is rebuilt (with a note naming it), never read."""

from __future__ import annotations

import json
import os
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_open
from ..errors import InputError
from .indexed import IndexedDataError
from .sample_index import SampleIndexBuilder

INDEX_VERSION = 3   # 2: keyed by content fingerprints; 3: + document lengths, checksummed caches


def checksum(arr: np.ndarray) -> str:
    """CRC-32 of an array's bytes: ~4 GB/s (the 2 GB of order caches of an 82M-sample run in
    about half a second), where BLAKE2b takes ~5x longer; it guards against damage, not forgery."""
    return format(zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")), "08x")


def _described(arr: np.ndarray) -> dict:
    return {"crc32": checksum(arr), "shape": list(arr.shape), "dtype": arr.dtype.str}


def build_order(builder: SampleIndexBuilder, documents: np.ndarray, seed: int, num_samples: Optional[int],
                prefix: str) -> Tuple[np.ndarray, np.ndarray]:
    """(document order, sample starts): a fresh shuffle of the documents per epoch, each
    epoch extending the starts of the ones before (sample_index.py, compiled). Without
    num_samples, one epoch."""
    rng = np.random.RandomState(seed % 2**32)
    parts: List[np.ndarray] = []
    while True:
        parts.append(rng.permutation(documents))
        if num_samples is None:
            # One epoch: the last, partial sample is dropped (its end is not a real start).
            builder.extend(parts[-1])
            return parts[-1], builder.starts.copy()
        builder.extend(parts[-1], num_samples + 1)
        if builder.finished:
            return np.concatenate(parts), builder.starts.copy()
        if len(parts) > 10_000:
            raise InputError(f"{prefix}: cannot make {num_samples} samples from documents "
                             f"{documents[0]}:{documents[-1] + 1} (all empty?)")


class OrderCache:
    """The files of one sample order: ``{base}_doc.npy``, ``_sample.npy``, ``_shuffle.npy``
    and the checksum record ``{base}_order.json``."""

    def __init__(self, base: str):
        self.base = base
        self.paths = [f"{base}_doc.npy", f"{base}_sample.npy", f"{base}_shuffle.npy"]
        self.record = f"{base}_order.json"

    def problem(self, documents: np.ndarray, prefix: str) -> Optional[str]:
        """Why the cache cannot be used as it is ('missing' when never built), or None."""
        paths, record = self.paths, self.record
        present = [p for p in paths + [record] if os.path.isfile(p)]
        if not present:
            return "missing"
        if len(present) < len(paths) + 1:
            return f"is incomplete ({', '.join(os.path.basename(p) for p in paths + [record] if p not in present)} " \
                   "missing)"
        try:
            with open(record) as fh:
                sums = json.load(fh)["arrays"]
            arrays = [np.load(p, mmap_mode="r") for p in paths]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"is unreadable ({exc})"
        for p, arr, want in zip(paths, arrays, sums if isinstance(sums, list) else []):
            if want != _described(arr):
                return f"does not match the checksums {os.path.basename(record)} recorded ({os.path.basename(p)} " \
                       "changed after it was written)"
        order, starts, shuffle = arrays
        lo, hi = int(documents[0]), int(documents[-1]) + 1
        if not isinstance(sums, list) or len(sums) != 3 or starts.ndim != 2 or starts.shape[1] != 2 or \
                len(shuffle) != len(starts) - 1 or not len(order) or int(order.min()) < lo or \
                int(order.max()) >= hi or int(starts[-1, 0]) > len(order) or \
                (len(shuffle) and (int(shuffle.min()) < 0 or int(shuffle.max()) >= len(shuffle))):
            return f"does not fit documents {lo}:{hi} of {prefix}"
        return None

    def write_record(self, arrays: Sequence[np.ndarray]) -> None:
        """The checksums, once the arrays are written: its presence means they are complete."""
        with atomic_open(self.record) as fh:
            json.dump({"version": INDEX_VERSION, "arrays": [_described(a) for a in arrays]}, fh)

    def load(self, prefix: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, sample starts, sample shuffle), memory-mapped."""
        try:
            order, starts, shuffle = (np.load(p, mmap_mode="r") for p in self.paths)
        except (OSError, ValueError) as exc:
            raise IndexedDataError(f"sample-order cache {self.base}_*.npy unreadable ({exc}); delete those files to "
                                   "rebuild them") from None
        if starts.ndim != 2 or starts.shape[1] != 2 or len(shuffle) != len(starts) - 1:
            raise IndexedDataError(f"sample-order cache {', '.join(self.paths)} does not fit {prefix} "
                                   f"({len(starts)} sample starts, {len(shuffle)} shuffled); delete those files to "
                                   "rebuild them")
        return order, starts, shuffle

"""Megatron's MMIDIDX indexed binaries (``.bin`` + ``.idx``), byte-compatible with
Megatron-LM's ``IndexedDataset``, and a fixed-shape float16 feature store of the same family.

``.idx`` layout (little-endian): magic ``MMIDIDX\\x00\\x00``, version u64 (1), dtype code u8,
sequence count u64, document count u64 (document boundaries, including the leading 0),
int32 sequence lengths, int64 byte pointers into ``.bin``, int64 document indices.
``.bin`` is the sequences' elements back to back.

Writers write ``name.tmp<pid>`` files and rename them into place only when complete, so a
reader never sees a half-written dataset; readers check every size against the header and
name the file, the expected and the found size when they disagree.

Every writer hashes what it writes (BLAKE2b of the data bytes and the index arrays) into a
content ``fingerprint``; the dataset metadata records it and every file derived from the data
(feature store, sample-order caches) is tied to it, so a derived file made from other data
is refused or rebuilt instead of being read as if it matched.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ..atomic import temp_name
from ..errors import InputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8

FEATURE_MAGIC = b"MVLFEAT\x00\x00"
FEATURE_VERSION = 2           # 2: + the source image table's fingerprint and the undecodable rows
FINGERPRINT_BYTES = 16


class IndexedDataError(InputError, ValueError):
    pass


def optimal_token_dtype(vocab_size: int):
    """Megatron's choice: uint16 when every id fits below 65,500, int32 otherwise."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


class IndexedDatasetWriter:
    """Appends sequences (and document boundaries) to ``prefix.bin/.idx``; ``finalize``
    writes the index and renames both files into place."""

    def __init__(self, prefix: str, dtype=np.int32, track_range: bool = False):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        # track_range: the smallest and largest value written, seen as they are written (one
        # min/max per sequence), so a reader compares them with a vocabulary in O(1).
        self.track_range = track_range
        self.smallest: Optional[int] = None
        self.largest: Optional[int] = None
        self._bin = open(temp_name(bin_path(prefix)), "wb")
        self._hash = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
        self.lengths: List[int] = []
        self.document_indices: List[int] = [0]
        self.fingerprint: Optional[str] = None   # set by finalize

    def _write(self, data) -> None:
        """`data`: bytes, or a C-contiguous array (written and hashed from its buffer, uncopied)."""
        self._bin.write(data)
        self._hash.update(data)

    def _see(self, values: np.ndarray) -> None:
        if self.track_range and values.size:
            lo, hi = int(values.min()), int(values.max())
            self.smallest = lo if self.smallest is None else min(self.smallest, lo)
            self.largest = hi if self.largest is None else max(self.largest, hi)

    def add_item(self, values: Sequence) -> None:
        if self.track_range:   # before the cast: an id too big for the dtype is seen, not wrapped
            raw = np.asarray(values)
            self._see(raw)
            arr = raw.astype(self.dtype, copy=False)
        else:
            arr = np.asarray(values, dtype=self.dtype)
        self._write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        self.lengths.append(arr.size)

    def end_document(self) -> None:
        self.document_indices.append(len(self.lengths))

    def add_document(self, sequences: Iterable[Sequence]) -> None:
        for seq in sequences:
            self.add_item(seq)
        self.end_document()

    def append_dataset(self, other_prefix: str) -> None:
        """Copies every sequence and document of another dataset (for merging partitions)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDataError(f"{idx_path(other_prefix)}: dtype {other.dtype} differs from {self.dtype}")
        offset = len(self.lengths)
        self.lengths.extend(int(x) for x in other.lengths)
        self.document_indices.extend(int(d) + offset for d in other.document_indices[1:])
        with open(bin_path(other_prefix), "rb") as fh:
            while chunk := fh.read(1 << 24):   # a multiple of every item size
                self._see(np.frombuffer(chunk, self.dtype))
                self._write(chunk)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        documents = np.asarray(self.document_indices, dtype=np.int64)
        self._hash.update(self.dtype.str.encode())
        self._hash.update(lengths.tobytes())
        self._hash.update(documents.tobytes())
        self.fingerprint = self._hash.hexdigest()
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(temp_name(idx_path(self.prefix)), "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<Q", VERSION))
            fh.write(struct.pack("<B", CODE_OF[self.dtype]))
            fh.write(struct.pack("<Q", len(lengths)))
            fh.write(struct.pack("<Q", len(self.document_indices)))
            fh.write(lengths.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(documents.tobytes(order="C"))
        os.replace(temp_name(bin_path(self.prefix)), bin_path(self.prefix))
        os.replace(temp_name(idx_path(self.prefix)), idx_path(self.prefix))

    def abort(self) -> None:
        try:
            self._bin.close()   # on a full disk this flushes and fails again: the temps go anyway
        except OSError:
            pass
        for p in (temp_name(bin_path(self.prefix)), temp_name(idx_path(self.prefix))):
            if os.path.exists(p):
                os.remove(p)


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is sequence i; ``ds.document(d)`` the list of
    sequences of document d."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise IndexedDataError(f"{p}: file not found")
        size = os.path.getsize(ipath)
        if size < _HEADER:
            raise IndexedDataError(f"{ipath}: truncated index: expected at least {_HEADER} bytes, found {size}")
        with open(ipath, "rb") as fh:
            header = fh.read(_HEADER)
        if header[:len(MAGIC)] != MAGIC:
            raise IndexedDataError(f"{ipath}: not an MMIDIDX index (magic {header[:len(MAGIC)]!r})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise IndexedDataError(f"{ipath}: version {version}, this reader reads {VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedDataError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER + n_seq * (4 + 8) + n_doc * 8
        if size != expected:
            raise IndexedDataError(f"{ipath}: index size mismatch: expected {expected} bytes for {n_seq} sequences "
                                   f"and {n_doc} document boundaries, found {size}")
        idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = _HEADER
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc, offset=off)
        docs = self.document_indices
        if n_doc and (docs[0] != 0 or docs[-1] != n_seq):   # (O(1): the table's index has 585M of them)
            raise IndexedDataError(f"{ipath}: document boundaries run from {docs[0]} to {docs[-1]}, not from 0 to "
                                   f"the {n_seq} sequences: the index is damaged")
        expected_bin = int(self.lengths.astype(np.int64).sum()) * self.dtype.itemsize
        found_bin = os.path.getsize(bpath)
        if found_bin != expected_bin:
            raise IndexedDataError(f"{bpath}: data size mismatch: the index describes {expected_bin} bytes, "
                                   f"found {found_bin}")
        # A plain ndarray over the map: np.memmap's subclass hooks cost more than the read.
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype).view(np.ndarray) if expected_bin \
            else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.lengths[i])]

    def scan(self, fingerprint: bool = True, chunk: int = 1 << 24):
        """One pass over the whole data (O(file size): callers bound the size they scan):
        ((smallest, its element index), (largest, its element index)), each None when empty,
        and the content fingerprint as the writer computes it (None without `fingerprint`)."""
        digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES) if fingerprint else None
        low = high = None
        for lo in range(0, len(self._bin), chunk):
            part = self._bin[lo:lo + chunk]
            bottom, top = part.min(), part.max()
            if low is None or bottom < low[0]:
                low = (int(bottom), lo + int(part.argmin()))
            if high is None or top > high[0]:
                high = (int(top), lo + int(part.argmax()))
            if digest is not None:
                digest.update(memoryview(np.ascontiguousarray(part)).cast("B"))
        if digest is None:
            return low, high, None
        digest.update(self.dtype.str.encode())
        digest.update(np.ascontiguousarray(self.lengths).tobytes())
        digest.update(np.ascontiguousarray(self.document_indices).tobytes())
        return low, high, digest.hexdigest()

    def document_of(self, element: int) -> int:
        """The document holding element `element` of the data."""
        seq = int(np.searchsorted(self.pointers // self.dtype.itemsize, element, side="right")) - 1
        return int(np.searchsorted(self.document_indices, seq, side="right")) - 1

    def document(self, d: int) -> List[np.ndarray]:
        return [self[i] for i in range(int(self.document_indices[d]), int(self.document_indices[d + 1]))]


# --- feature store ------------------------------------------------------------------------

class FeatureStoreWriter:
    """Appends fixed-shape float16 [N, d] blocks (one per image) to ``prefix.bin`` with a
    ``prefix.idx`` header: magic, version, count, N, d, the fingerprint of the image table
    the features were computed from (``source``), and the table rows whose image could not
    be decoded (their blocks are zeros; training drops those images). Renamed into place on
    finalize; ``abort`` removes the temporary files."""

    def __init__(self, prefix: str, num_tokens: int, dim: int, source: str):
        if len(bytes.fromhex(source)) != FINGERPRINT_BYTES:
            raise ValueError(f"{prefix}: source fingerprint {source!r} is not {FINGERPRINT_BYTES} hex bytes")
        self.prefix, self.shape, self.count, self.source = prefix, (num_tokens, dim), 0, source
        self.bad_rows: List[int] = []
        self._bin = open(temp_name(bin_path(prefix)), "wb")

    def add(self, features: np.ndarray) -> None:
        arr = np.asarray(features, dtype=np.float16)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != self.shape:
            raise IndexedDataError(f"{self.prefix}: feature block of shape {arr.shape[1:]}, store holds {self.shape}")
        self._bin.write(np.ascontiguousarray(arr).tobytes())
        self.count += arr.shape[0]

    def add_bad(self) -> None:
        """A zero block for a row whose image could not be decoded, recorded as such."""
        self.bad_rows.append(self.count)
        self.add(np.zeros(self.shape, np.float16))

    def finalize(self) -> None:
        self._bin.close()
        with open(temp_name(idx_path(self.prefix)), "wb") as fh:
            fh.write(FEATURE_MAGIC + struct.pack("<QQQQ", FEATURE_VERSION, self.count, *self.shape))
            fh.write(bytes.fromhex(self.source))
            fh.write(struct.pack("<Q", len(self.bad_rows)))
            fh.write(np.asarray(self.bad_rows, np.int64).tobytes())
        os.replace(temp_name(bin_path(self.prefix)), bin_path(self.prefix))
        os.replace(temp_name(idx_path(self.prefix)), idx_path(self.prefix))

    def abort(self) -> None:
        try:
            self._bin.close()   # on a full disk this flushes and fails again: the temps go anyway
        except OSError:
            pass
        for p in (temp_name(bin_path(self.prefix)), temp_name(idx_path(self.prefix))):
            if os.path.exists(p):
                os.remove(p)


def write_concatenated(prefix: str, stores: List["FeatureStore"], source: str) -> None:
    """One feature store holding `stores` in order (their undecodable rows renumbered),
    made from the image table with fingerprint `source`."""
    out = FeatureStoreWriter(prefix, *stores[0].shape, source=source)
    try:
        for store in stores:
            out.bad_rows.extend(int(r) + out.count for r in store.bad_rows)
            out.add(store.features)
        out.finalize()
    except BaseException:
        out.abort()
        raise


class FeatureStore:
    """Memory-mapped [count, N, d] float16 features. With ``source`` (the image table's
    fingerprint from the dataset metadata) and ``expected_count``, a store made from other
    data is refused, naming both files."""

    def __init__(self, prefix: str, expected_count: Optional[int] = None, source: Optional[str] = None,
                 table: str = "the image table"):
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise IndexedDataError(f"{p}: file not found")
        with open(ipath, "rb") as fh:
            raw = fh.read()
        head = len(FEATURE_MAGIC) + 32
        if len(raw) < head or raw[:len(FEATURE_MAGIC)] != FEATURE_MAGIC:
            raise IndexedDataError(f"{ipath}: not a feature-store index ({len(raw)} bytes)")
        version, count, n, d = struct.unpack("<QQQQ", raw[len(FEATURE_MAGIC):head])
        if version != FEATURE_VERSION:
            raise IndexedDataError(f"{ipath}: feature store version {version} (this code reads {FEATURE_VERSION}: "
                                   "it records the data it was made from); re-run tools/extract_image_features.py")
        tail = head + FINGERPRINT_BYTES + 8
        n_bad = struct.unpack("<Q", raw[head + FINGERPRINT_BYTES:tail])[0] if len(raw) >= tail else -1
        if n_bad < 0 or len(raw) != tail + 8 * n_bad:
            raise IndexedDataError(f"{ipath}: truncated or damaged feature-store index ({len(raw)} bytes)")
        self.source = raw[head:head + FINGERPRINT_BYTES].hex()
        self.bad_rows = np.frombuffer(raw, np.int64, count=n_bad, offset=tail).copy()
        expected = count * n * d * 2
        found = os.path.getsize(bpath)
        if found != expected:
            raise IndexedDataError(f"{bpath}: feature data size mismatch: expected {expected} bytes "
                                   f"({count} x [{n}, {d}] float16), found {found}")
        if source is not None and source != self.source:
            raise IndexedDataError(f"{ipath} was computed from other data than {table} (fingerprint "
                                   f"{self.source}, the table has {source}): the dataset was re-preprocessed "
                                   "after extraction; re-run tools/extract_image_features.py")
        if expected_count is not None and count != expected_count:
            raise IndexedDataError(f"{bpath}: feature store holds {count} images, {table} has {expected_count}")
        self.count, self.shape = count, (n, d)
        self.features = np.memmap(bpath, mode="r", dtype=np.float16, shape=(count, n, d)).view(np.ndarray) \
            if count else np.zeros((0, n, d), np.float16)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.features[i]

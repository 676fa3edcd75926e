"""The sample index at corpus scale: where each packed sample starts, compiled.

Same rules and the same answer, row for row, as ``packing.build_sample_starts`` (the readable
reference, kept for the tests and the benchmark): a state machine over text runs and image
blocks that cannot be vectorised (a block never splits, a sample holds at most ``max_images``
blocks), so it is compiled with numba. 82M samples of the paper's run build in seconds
instead of the reference's 8-14 minutes, which every other rank would spend waiting at a
barrier longer than NCCL's default timeout.

Under ``whole_documents`` (instruction data) every row starts a conversation at offset 0, packed
or not: the index only places conversations, and ``packing.materialize`` cuts one longer than a
sample at a turn boundary, so the rows do not depend on where its turns end.

The builder is incremental: ``extend`` continues from where the previous order part left
off (a sample may straddle the seam), so a multi-epoch index appends one epoch at a time
instead of rebuilding everything before it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .indexed import IndexedDataError
from .packing import PackingConfig

_U = np.uint64


@njit(cache=True, inline="always")
def _after(seed, position, image_number):
    # splitmix64 of (seed, position of the document in the order, image number): the
    # same bit as packing._splitmix_bit, in wrapping uint64 arithmetic.
    x = (seed * _U(0x9E3779B97F4A7C15) + _U(position) * _U(0xBF58476D1CE4E5B9)
         + _U(image_number) * _U(0x94D049BB133111EB))
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return np.int64((x ^ (x >> _U(31))) >> _U(63))


@intrinsic
def _prefetch(typingctx, array, index):
    """Asks for array[index]'s cache line ahead of use (llvm.prefetch): documents come in a
    random order, so each one's row and spans are cache misses; issued a few documents
    early, they arrive while the loop works on the ones before."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, array_type, ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, types.intp), codegen


_AHEAD = 16


@njit(cache=True, inline="always")
def _emit(out, n_out, position, offset):
    """Writes the next sample's start; returns (rows, fill, images) of a fresh sample."""
    out[n_out, 0], out[n_out, 1] = position, offset
    return n_out + 1, 0, 0


@njit(cache=True, error_model="numpy")
def _gather_table(docs, doc_table, table, ptr):
    """The documents' rows (tokens, first span, span count) in order, and where each one's
    spans will sit; returns the span count. Gathering first lets the packing loop read memory
    sequentially: one pass of independent, prefetched reads is faster than taking the
    misses inside the branchy loop. Buffers are the builder's, reused chunk after chunk."""
    n = docs.shape[0]
    for k in range(n):
        if k + _AHEAD < n:
            _prefetch(doc_table, docs[k + _AHEAD] * 3)
        d = docs[k]
        table[k, 0], table[k, 1], table[k, 2] = doc_table[d, 0], doc_table[d, 1], doc_table[d, 2]
    ptr[0] = 0
    for k in range(n):
        ptr[k + 1] = ptr[k] + table[k, 2]
    return ptr[n]


@njit(cache=True, error_model="numpy")
def _gather_spans(n, table, ptr, pairs, spans):
    """Each document's (start, end) int32 pairs, moved as one int64 each."""
    for k in range(n):
        if k + _AHEAD < n:
            _prefetch(pairs, table[k + _AHEAD, 1])
        lo, p = table[k, 1], ptr[k]
        for j in range(table[k, 2]):
            spans[p + j] = pairs[lo + j]


@njit(cache=True, error_model="numpy")
def _pack(k_base, table, n_docs, span_ptr, spans, seed, S, block, max_images, pack_documents,
          k_first, fill, images, out, n_out, limit, inserts, whole_documents):
    """Lays out documents k_first:n_docs of a chunk of the order (their rows and spans
    gathered in order by _gather_*) into `out` (rows (position in the global order, element
    offset)) from the carried (fill, images). Returns (rows written, next k, fill, images,
    finished): it stops before a document whose samples might not fit in `out`, or once
    `limit` rows exist."""
    capacity = out.shape[0]
    k = k_first
    while k < n_docs:
        n_tok = table[k, 0]
        lo, n_img = span_ptr[k], span_ptr[k + 1] - span_ptr[k]
        # Each row a document adds consumes at least one of its elements, except one padded
        # end before a block: elements + 2 bounds the rows it can add.
        if n_out + n_tok + n_img * block + 2 > capacity:
            return n_out, k, fill, images, False
        position = k_base + k
        if whole_documents:   # never split: end the sample before a document that does not fit
            length = n_tok + n_img * block
            if fill > 0 and (fill + length > S or images + n_img > max_images or not pack_documents):
                n_out, fill, images = _emit(out, n_out, position, 0)
                if n_out >= limit:
                    return n_out, k, fill, images, True
            fill += length
            images += n_img
            if fill >= S or images > max_images or (fill > 0 and not pack_documents):
                n_out, fill, images = _emit(out, n_out, position + 1, 0)   # (a longer one: turn_cut)
                if n_out >= limit:
                    return n_out, k + 1, fill, images, True
            k += 1
            continue
        for n in range(n_img):   # insert positions, stably sorted (few per document)
            start = np.int64(spans[lo + n, 0])
            # start or end by the coin, without a branch: the coin is unpredictable by design.
            p = start + _after(seed, position, n) * (np.int64(spans[lo + n, 1]) - start)
            j = n
            while j > 0 and inserts[j - 1] > p:
                inserts[j] = inserts[j - 1]
                j -= 1
            inserts[j] = p
        offset, prev = 0, 0
        for e in range(n_img + 1):
            text = (n_tok if e == n_img else inserts[e]) - prev
            while text > 0:
                take = min(text, S - fill)
                fill += take
                text -= take
                offset += take
                prev += take
                if fill == S:
                    n_out, fill, images = _emit(out, n_out, position, offset)
                    if n_out >= limit:
                        return n_out, k + 1, fill, images, True
            if e == n_img:
                break
            if fill + block > S or images == max_images:   # this sample ends padded before the block
                n_out, fill, images = _emit(out, n_out, position, offset)
                if n_out >= limit:
                    return n_out, k + 1, fill, images, True
            fill += block
            images += 1
            offset += block
            if fill == S:
                n_out, fill, images = _emit(out, n_out, position, offset)
                if n_out >= limit:
                    return n_out, k + 1, fill, images, True
        if not pack_documents and fill > 0:   # this document's sample ends here, padded
            n_out, fill, images = _emit(out, n_out, position + 1, 0)
            if n_out >= limit:
                return n_out, k + 1, fill, images, True
        k += 1
    return n_out, k, fill, images, False


@njit(cache=True)
def _first_bad_span(flat, first, counts, doc_tokens, num_images):
    """(document, image number) of the first (start, end, image) triple outside its document's
    tokens or the image table, or (-1, -1): one pass, no temporaries (585M images in seconds)."""
    for d in range(first.shape[0]):
        base = first[d]
        for j in range(counts[d] // 3):
            s, e, img = flat[base + 3 * j], flat[base + 3 * j + 1], flat[base + 3 * j + 2]
            if s < 0 or e < s or e > doc_tokens[d] or img < 0 or img >= num_images:
                return d, j
    return -1, -1


class SpanTable:
    """Every document's image spans as flat arrays: document d's images are rows
    lo[d]:hi[d] of `pairs`, (start, end) token positions in span order (int32: 8 bytes an
    image, 4.7 GB for all of MMC4's 585M). Images in `dropped` (not decodable at
    extraction) are left out, as the dataset's reader leaves them out."""

    def __init__(self, pairs: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.pairs, self.lo, self.hi = pairs, lo, hi

    @classmethod
    def empty(cls, num_documents: int) -> "SpanTable":
        zeros = np.zeros(num_documents, np.int64)
        return cls(np.zeros((0, 2), np.int32), zeros, zeros)

    @classmethod
    def from_triples(cls, triples: np.ndarray, per_document: np.ndarray,
                     dropped: Optional[np.ndarray] = None) -> "SpanTable":
        """triples: [M, 3] (start, end, image) of all documents back to back;
        per_document: how many triples each document has."""
        triples = np.asarray(triples).reshape(-1, 3)
        per_document = np.asarray(per_document, np.int64)
        if dropped is not None and len(dropped) and len(triples):
            keep = ~np.isin(triples[:, 2], dropped)
            doc_of = np.repeat(np.arange(len(per_document)), per_document)
            per_document = np.bincount(doc_of[keep], minlength=len(per_document)).astype(np.int64)
            triples = triples[keep]
        if len(triples) and int(triples[:, :2].max()) >= 2**31:
            raise ValueError("an image span starts beyond 2^31 tokens into its document")
        hi = np.cumsum(per_document)
        return cls(np.ascontiguousarray(triples[:, :2], np.int32), hi - per_document, hi)

    @classmethod
    def from_indexed(cls, spans, dropped: Optional[np.ndarray] = None, doc_tokens: Optional[np.ndarray] = None,
                     num_images: Optional[int] = None, tokens_file: str = "the token file") -> "SpanTable":
        """From a ``P_images`` sidecar (an IndexedDataset, one int64 sequence per document).
        With doc_tokens and num_images, every span is checked against its document's token
        count (in `tokens_file`) and the image table: a damaged sidecar, or one from another
        preprocessing run than the tokens, is named instead of read as positions."""
        lengths = np.asarray(spans.lengths, np.int64)
        where = f"{spans.prefix}.bin"
        if lengths.size and np.any(lengths % 3):
            bad = int(np.flatnonzero(lengths % 3)[0])
            raise IndexedDataError(f"{where}: document {bad} has {lengths[bad]} span values, not (start, end, "
                                   "image) triples: the file is damaged")
        first = np.asarray(spans.pointers, np.int64) // spans.dtype.itemsize
        flat = spans._bin
        if len(first) and (int(first.min()) < 0 or int((first + lengths).max()) > len(flat)):
            raise IndexedDataError(f"{spans.prefix}.idx: sequence pointers outside {where} ({len(flat)} values): "
                                   "the index is damaged")
        if doc_tokens is not None:
            if len(lengths) != len(doc_tokens):
                raise IndexedDataError(f"{where}: span lists for {len(lengths)} documents, {tokens_file} holds "
                                       f"{len(doc_tokens)}: the files come from different preprocessing runs")
            d, j = _first_bad_span(np.asarray(flat, np.int64), first, lengths, np.asarray(doc_tokens, np.int64),
                                   np.int64(num_images if num_images is not None else 2**62))
            if d >= 0:
                s, e, img = (int(x) for x in flat[first[d] + 3 * j:first[d] + 3 * j + 3])
                raise IndexedDataError(
                    f"{where}: document {d}, image {j}: span ({s}, {e}) with image id {img} lies outside the "
                    f"document's {int(doc_tokens[d])} tokens in {tokens_file} or the {num_images} images of the "
                    "image table: the file is damaged, or the files of this prefix come from different "
                    "preprocessing runs; re-run tools/preprocess_data.py")
        if not np.array_equal(first, np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else first):
            flat = np.concatenate([flat[a:a + n] for a, n in zip(first.tolist(), lengths.tolist())])
        return cls.from_triples(np.asarray(flat, np.int64), lengths // 3, dropped)


class SampleIndexBuilder:
    """Sample starts over an order that grows by parts (epochs): ``extend(part)`` appends the
    rows the new documents complete. ``starts`` is [rows, 2], as ``build_sample_starts``
    returns: the first row (0, 0), then where each next sample starts."""

    def __init__(self, doc_tokens: np.ndarray, spans: SpanTable, cfg: PackingConfig):
        S, block = cfg.seq_length, cfg.num_image_tokens + 2
        if cfg.max_images < 1:
            raise ValueError(f"max images per sample must be >= 1, got {cfg.max_images}")
        if block > S:
            raise ValueError(f"an image block ({block} positions) does not fit in --seq-length {S}")
        self.cfg, self.spans = cfg, spans
        self._doc_table = np.ascontiguousarray(np.stack([doc_tokens, spans.lo, spans.hi - spans.lo], 1), np.int64)
        counts = spans.hi - spans.lo
        self._inserts = np.zeros(max(int(counts.max()) if len(counts) else 0, 1), np.int64)
        # int32 rows while every value fits (half the memory to fault in: 656 MB, not 1.3 GB,
        # for the paper's 82M samples); int64 from the first order part that would not.
        longest = int((doc_tokens + counts * block).max()) if len(counts) else 0
        self._rows = np.zeros((1024, 2), np.int32 if longest < 2**31 else np.int64)
        self._n, self._fill, self._images, self.order_length = 1, 0, 0, 0
        # Gather buffers, reused for every chunk (fresh ones would fault their pages in each time).
        self._table = np.zeros((self.CHUNK, 3), np.int64)
        self._ptr = np.zeros(self.CHUNK + 1, np.int64)
        self._spans = np.zeros((0, 2), spans.pairs.dtype)
        self._pairs_as_int64 = np.ascontiguousarray(spans.pairs).view(np.int64).reshape(-1)
        self.finished = False

    @property
    def starts(self) -> np.ndarray:
        return self._rows[:self._n]

    def extend(self, order_part: np.ndarray, limit: Optional[int] = None) -> None:
        """Lays out the next part of the order; with `limit`, stops once that many rows exist."""
        order_part = np.asarray(order_part, np.int64)
        if self._rows.dtype == np.int32 and self.order_length + len(order_part) + 1 >= 2**31:
            self._rows = self._rows.astype(np.int64)
        if limit is not None:   # the caller's size: untouched pages of np.zeros cost nothing
            self._reserve(limit)
        for lo in range(0, len(order_part), self.CHUNK):
            if self.finished:
                return
            self._extend_chunk(order_part[lo:lo + self.CHUNK], limit, self.order_length)
            self.order_length += len(order_part[lo:lo + self.CHUNK])

    CHUNK = 1 << 16
    """Documents gathered at once (the gather buffers' size)."""

    def _extend_chunk(self, docs: np.ndarray, limit: Optional[int], k_base: int) -> None:
        cfg, block, n = self.cfg, self.cfg.num_image_tokens + 2, len(docs)
        table, ptr = self._table, self._ptr
        total = _gather_table(docs, self._doc_table, table, ptr)
        if total > len(self._spans):
            self._spans = np.empty((2 * total, 2), self.spans.pairs.dtype)
        _gather_spans(n, table, ptr, self._pairs_as_int64, self._spans.view(np.int64).reshape(-1))
        limit = (1 << 62) if limit is None else limit
        # Expected rows with room to spare; _pack stops at a document that might not fit.
        expected = (int(table[:n, 0].sum()) + int(total) * block) // cfg.seq_length * 5 // 4 + 64
        if not cfg.pack_documents:
            expected += n
        self._reserve(min(self._n + expected, limit))
        k = 0
        while True:
            rows, k, self._fill, self._images, done = _pack(
                k_base, table, n, ptr, self._spans, _U(cfg.seed % (1 << 64)), cfg.seq_length, block,
                cfg.max_images, cfg.pack_documents, k, self._fill, self._images, self._rows, self._n, limit,
                self._inserts, cfg.whole_documents)
            self._n = rows
            if done:
                self.finished = True
                return
            if k >= n:
                return
            self._reserve(self._n + int(table[k, 0]) + int(table[k, 2]) * block + 2)

    def _reserve(self, rows: int) -> None:
        """At least `rows` rows of room, growing geometrically."""
        if rows <= len(self._rows):
            return
        grown = np.zeros((max(rows, 2 * len(self._rows)), 2), self._rows.dtype)
        grown[:self._n] = self._rows[:self._n]
        self._rows = grown


def build_sample_starts_fast(doc_order: np.ndarray, doc_tokens: np.ndarray, spans: SpanTable,
                             cfg: PackingConfig, num_samples: int) -> np.ndarray:
    """``packing.build_sample_starts`` (same arguments, spans as a SpanTable), compiled."""
    builder = SampleIndexBuilder(doc_tokens, spans, cfg)
    builder.extend(doc_order, num_samples + 1)
    return builder.starts.astype(np.int64)

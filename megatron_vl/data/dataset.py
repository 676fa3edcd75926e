"""Packed multimodal datasets: one preprocessed prefix read as fixed-length samples, its
files checked first, and the train/valid/test datasets of a blend.

Sample order is built once per (data, split, seq length, N, max images, seed, sample count)
and cached as ``.npy`` beside the data (or under ``--data-cache-path``; order_cache.py):
document order (a fresh shuffle per epoch), sample starts, sample shuffle. With
torch.distributed up, rank 0 builds while the others wait. ``dataset[i]`` depends only on
i: any rank, any time.

The files of a prefix must agree before anything is read from them: document counts and
per-document sizes between the ``.idx`` files and meta.json (every rank, O(documents)); the
token-id range meta.json records inside the tokenizer's vocabulary (every rank, O(1)); on
rank 0, the bytes of files up to VERIFY_FINGERPRINT_BYTES against the fingerprints meta.json
records (their token ids checked in the same pass), and every image span inside its
document. Nothing reads a whole corpus-sized file at start-up: the token ids of every
document are also checked as it is read (the only check of a large file from before the
recorded range). An error found on rank 0 is raised on every rank, never left to a peer
waiting in a collective (rank0.py). Blends: blend.py; the sampler: sampler.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_open
from ..config import ConfigError, split_weights
from ..errors import InputError, OutputError
from .blend import BlendedDataset, parse_blend, split_ranges
from .indexed import FeatureStore, IndexedDataError, IndexedDataset
from .layout import open_meta, sidecar
from .order_cache import INDEX_VERSION, OrderCache, build_order, checksum
from .packing import CUTS, NO_ANSWER, PackingConfig, laid_out_document, materialize, turn_cut
from .rank0 import on_rank0
from .sample_index import SampleIndexBuilder, SpanTable
from .sampler import PretrainingSampler, collate
from .tokenizer import IMG, IMG_END

VERIFY_FINGERPRINT_BYTES = 1 << 30
"""Files up to this size are hashed at start-up against the fingerprint their metadata records
(~1 s a GiB, once: the verdict is cached by real path, size and mtime); larger ones are checked
by structure only (counts, sizes, spans inside their documents, token ids as they are read)."""

__all__ = ["split_weights", "split_ranges", "open_meta", "PackedDataset", "parse_blend", "build_train_valid_test",
           "BlendedDataset", "PretrainingSampler", "collate"]


def _save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def _file_stats(paths: Sequence[str]) -> Dict[str, List[int]]:
    return {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}


class PackedDataset:
    """Fixed-length packed samples from one preprocessed dataset prefix."""

    def __init__(self, prefix: str, cfg: PackingConfig, num_samples: Optional[int] = None,
                 doc_range: Optional[Tuple[int, int]] = None, cache_dir: Optional[str] = None,
                 require_features: bool = True):
        self.prefix = prefix
        self.meta = meta = open_meta(prefix)
        ids = meta["tokenizer"].get("image_token_ids") or {}
        if IMG not in ids or IMG_END not in ids:
            raise IndexedDataError(f"{prefix}.meta.json: tokenizer lacks the {IMG} / {IMG_END} special tokens; "
                                   f"re-run tools/preprocess_data.py")
        self.img_id, self.img_end_id = ids[IMG], ids[IMG_END]
        self.eod_id = meta["tokenizer"].get("eod_id")
        self.vocab = int(meta["tokenizer"]["vocab_size"])
        self.text = IndexedDataset(prefix)
        self.multimodal = bool(meta["multimodal"])
        self.spans = IndexedDataset(sidecar(prefix, "images")) if self.multimodal else None
        # Instruction data: which tokens and images are answers (the only targets), and no
        # conversation split across samples or cut inside a later turn (packing.turn_cut): a
        # continuation would train answers without their question.
        self.loss_mask = IndexedDataset(sidecar(prefix, "loss_mask")) if meta.get("loss_mask") else None
        if self.loss_mask is not None:
            cfg = replace(cfg, whole_documents=True)
        sampling = meta.get("doc_sampling") or {}
        if sampling.get("mode") == "paper":
            # One subsequence per document, cut when preprocessing (doc_sampling.py) and sized for
            # its N: never split across samples; several share a row (document isolation).
            if sampling.get("num_image_tokens") != cfg.num_image_tokens:
                raise IndexedDataError(
                    f"{sidecar(prefix, 'meta')}: --doc-sampling paper sized its subsequences for N = "
                    f"{sampling.get('num_image_tokens')} visual tokens per image, the run expects N = "
                    f"{cfg.num_image_tokens}; re-run tools/preprocess_data.py with --num-image-tokens "
                    f"{cfg.num_image_tokens}")
            cfg = replace(cfg, whole_documents=True)
        self.cfg = cfg
        self.num_images = num_images = meta.get("num_images", 0)
        self.fingerprint = meta["fingerprint"]
        # [images, N, d] float16: the memory-mapped store, or an empty array of the run's shape.
        self.features = np.zeros((0, cfg.num_image_tokens, cfg.embed_dim or 1), np.float16)
        self.dropped_images = np.zeros(0, np.int64)   # undecodable at extraction: never laid out
        if self.multimodal and num_images and require_features:
            store = FeatureStore(sidecar(prefix, "features"), expected_count=num_images,
                                 source=self.fingerprint["table"], table=sidecar(prefix, "table") + ".bin")
            if store.shape[0] != cfg.num_image_tokens:
                raise IndexedDataError(f"{sidecar(prefix, 'features')}: {store.shape[0]} visual tokens per "
                                       f"image, the run expects N = {cfg.num_image_tokens}")
            if cfg.embed_dim is not None and store.shape[1] != cfg.embed_dim:
                raise IndexedDataError(f"{sidecar(prefix, 'features')}: features of width {store.shape[1]}, "
                                       f"the run expects d = {cfg.embed_dim}")
            self.features = store.features
            self.dropped_images = store.bad_rows
        di = self.text.document_indices
        lengths = self.text.lengths.astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(lengths)])
        self.doc_tokens = csum[di[1:]] - csum[di[:-1]]
        self._check_counts()
        n_docs = self.text.num_documents
        lo, hi = doc_range or (0, n_docs)
        self.documents = np.arange(lo, hi, dtype=np.int64)
        if not len(self.documents):
            raise InputError(f"{prefix}: no documents to read" + (f" in range {lo}:{hi}" if doc_range else "")
                             + f" (the dataset holds {n_docs}; see {prefix}.meta.json's report)")
        self.notes: List[str] = []   # what the run reports at start-up about this data
        self.truncated: Dict[str, int] = {}   # conversations longer than a sample, by packing.turn_cut's kind
        self._check_recorded_ids()
        if cfg.whole_documents:
            self._count_truncated()
        self.doc_order, self.starts, self.shuffle = self._load_or_build_index(num_samples, cache_dir)

    # --- checks ----------------------------------------------------------------------------

    def _disagree(self, what: str) -> IndexedDataError:
        return IndexedDataError(f"{what}: the files of {self.prefix} come from different preprocessing runs (or "
                                f"one is damaged); re-run tools/preprocess_data.py for {self.prefix}")

    def _check_counts(self) -> None:
        """Documents (and per-document sizes) agree between the .idx files and meta.json:
        O(documents), every rank, every start."""
        n, recorded = self.text.num_documents, self.meta.get("num_documents")
        if len(self.doc_tokens) and int(self.doc_tokens.min()) < 0:
            raise IndexedDataError(f"{self.prefix}.idx: document {int(np.argmin(self.doc_tokens))} ends before it "
                                   "starts: the index is damaged")
        if recorded is not None and recorded != n:
            raise self._disagree(f"{self.prefix}.idx holds {n} documents, {self.prefix}.meta.json records {recorded}")
        for ds in (self.spans, self.loss_mask):
            if ds is not None and (ds.num_documents != n or len(ds) != n):
                raise self._disagree(f"{ds.prefix}.idx holds {ds.num_documents} documents in {len(ds)} sequences, "
                                     f"{self.prefix}.idx {n} documents")
        if self.spans is not None and len(self.spans) and int(np.max(self.spans.lengths)) > 3 * self.num_images:
            raise self._disagree(f"{self.spans.prefix}.idx lists more images in one document than "
                                 f"{self.prefix}.meta.json's {self.num_images}")
        if self.loss_mask is not None:
            images = self.spans.lengths.astype(np.int64) // 3 if self.spans is not None else 0
            bad = np.flatnonzero(self.loss_mask.lengths.astype(np.int64) != self.doc_tokens + images)
            if len(bad):
                d = int(bad[0])
                n_img = int(images[d]) if self.spans is not None else 0
                raise self._disagree(f"{self.loss_mask.prefix}.bin: document {d} has {int(self.loss_mask.lengths[d])} "
                                     f"loss-mask flags, {self.prefix}.bin {int(self.doc_tokens[d])} tokens and "
                                     f"{n_img} images")

    def _id_error(self, token: int, document: int, largest: bool = False) -> IndexedDataError:
        which = ("the largest" if token >= self.vocab else "the smallest") + ", " if largest else ""
        return IndexedDataError(
            f"{self.prefix}.bin: token id {token} ({which}in document {document}) is outside the tokenizer's "
            f"{self.vocab}-token vocabulary ({sidecar(self.prefix, 'meta')}): the file is damaged or was written "
            f"with another tokenizer; re-run tools/preprocess_data.py for {self.prefix}")

    def _check_recorded_ids(self) -> None:
        """The token-id range preprocessing recorded inside the vocabulary: O(1), every rank.
        Data from before the record is checked document by document as it is read (a whole
        corpus-sized .bin is never read at start-up), and the run says so."""
        meta_path, record = sidecar(self.prefix, "meta"), self.meta.get("token_ids")
        if record is None:
            if os.path.getsize(self.prefix + ".bin") > VERIFY_FINGERPRINT_BYTES:   # (smaller: checked when hashed)
                self.notes.append(f"{meta_path} predates the token-id record: token ids are checked against the "
                                  f"{self.vocab}-token vocabulary as samples are read, not at start-up (re-run "
                                  f"tools/preprocess_data.py for {self.prefix} to check them up front)")
            return
        lo, hi = (record.get(k) if isinstance(record, dict) else "?" for k in ("min", "max"))
        if lo is None and hi is None:
            return   # no tokens at all (refused later, with the document count)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
            raise IndexedDataError(f"{meta_path}: token_ids {record!r} is not a {{min, max}} pair of ids: the "
                                   f"metadata is damaged; re-run tools/preprocess_data.py for {self.prefix}")
        if lo < 0 or hi >= self.vocab:
            raise IndexedDataError(f"{meta_path}: the token ids written to {self.prefix}.bin run from {lo} to {hi}, "
                                   f"outside the tokenizer's {self.vocab}-token vocabulary it records: the tokenizer "
                                   f"or the metadata is wrong; re-run tools/preprocess_data.py for {self.prefix}")

    def _check_content(self, directory: str) -> None:
        """Rank 0, before the order: files small enough to hash (VERIFY_FINGERPRINT_BYTES each,
        so the check stays bounded at any corpus size) against the fingerprints meta.json
        records, their token ids against the vocabulary in the same pass. The verdict is cached
        in `directory` by real path, size and mtime (a relative and an absolute prefix agree)."""
        todo = [(kind, ds) for kind, ds in (("tokens", self.text), ("images", self.spans),
                                            ("loss_mask", self.loss_mask))
                if ds is not None and kind in self.fingerprint and
                os.path.getsize(ds.prefix + ".bin") <= VERIFY_FINGERPRINT_BYTES]
        if not todo:
            return
        real = os.path.realpath(self.prefix)
        record = os.path.join(directory, f"{os.path.basename(self.prefix)}_"
                                         f"{hashlib.md5(real.encode()).hexdigest()[:8]}_check.json")
        files = [os.path.realpath(ds.prefix + ext) for _, ds in todo for ext in (".bin", ".idx")]
        state = {"version": 2, "fingerprint": self.fingerprint, "files": _file_stats(files)}
        try:
            with open(record) as fh:
                if json.load(fh) == state:
                    return
        except (OSError, ValueError):
            pass
        meta_path = sidecar(self.prefix, "meta")
        mismatched = []
        for kind, ds in todo:
            low, high, found = ds.scan(fingerprint=True)
            if kind == "tokens" and high is not None:
                for token, where in (high, low):
                    if not 0 <= token < self.vocab:
                        raise self._id_error(token, ds.document_of(where), largest=True)
            if found != self.fingerprint[kind]:
                mismatched.append((kind, ds, found))
        for kind, ds, found in mismatched:
            if kind == "images":   # name the damaged record where one is out of place
                SpanTable.from_indexed(ds, None, self.doc_tokens, self.num_images, f"{self.prefix}.bin")
            raise self._disagree(f"{ds.prefix}.bin/.idx do not match the fingerprint {meta_path} records for them "
                                 f"(content {found}, recorded {self.fingerprint[kind]})")
        try:
            with atomic_open(record) as fh:
                json.dump(state, fh)
        except OSError:
            pass   # a read-only data directory: checked again next time

    def _kept_images(self) -> np.ndarray:
        """Images per document, without those extraction could not decode."""
        if self.spans is None:
            return np.zeros(self.text.num_documents, np.int64)
        counts = self.spans.lengths.astype(np.int64) // 3
        if len(self.dropped_images):
            table = SpanTable.from_indexed(self.spans, self.dropped_images)
            counts = table.hi - table.lo
        return counts

    def _count_truncated(self) -> None:
        """Counts the conversations longer than a sample by how ``packing.turn_cut`` keeps them
        (``self.truncated``: kind -> count) and notes the counts; refuses a --seq-length that
        leaves no conversation of the dataset an answer, which would train on nothing at all.
        Laid out as at order position 0: instruction images sit at zero-length spans, where
        the before/after coin changes nothing, so the count holds for every occurrence."""
        S, block, most = self.cfg.seq_length, self.cfg.num_image_tokens + 2, self.cfg.max_images
        images = self._kept_images()[self.documents]
        over = (self.doc_tokens[self.documents] + images * block > S) | (images > most)
        where = f"{self.prefix} (documents {self.documents[0]}:{self.documents[-1] + 1})"
        longer = (f"{int(over.sum())} of {len(self.documents)} {{}} longer than --seq-length {S} (or with more than "
                  f"--max-images-per-sample {most} images)")
        if self.loss_mask is None:   # no turns: documents are cut at the sample's end
            if over.any():
                self.notes.append(f"{where}: {longer.format('documents')}: truncated to one sample each")
            return
        self.truncated = dict.fromkeys(CUTS, 0)
        if not over.any():
            return
        first: List[int] = []   # where each unanswered conversation's first answer is laid out
        for d in self.documents[over]:
            visual, answer = self._laid_out_flags(int(d))
            kind = turn_cut(visual, answer, S, most, block)[1]
            self.truncated[kind] += 1
            if kind == NO_ANSWER and answer.any():
                first.append(int(np.argmax(answer)))
        unanswered = self.truncated[NO_ANSWER]
        if unanswered == len(self.documents):
            raise ConfigError(f"--seq-length {S}: no conversation of {where} has an answer within one sample"
                              + (f" (the earliest answer starts at position {min(first)})" if first else "")
                              + ": nothing would be trained; raise --seq-length")
        self.notes.append(f"{where}: {longer.format('conversations')}, each kept alone in one sample: "
                          + "; ".join(f"{n} {CUTS[kind]}" for kind, n in self.truncated.items() if n))

    def _laid_out_flags(self, d: int) -> Tuple[np.ndarray, np.ndarray]:
        """(visual index, answer flag) per laid-out element of conversation d, tokens unread."""
        spans, kept = self._doc_spans_and_kept(d)
        n_tok = int(self.doc_tokens[d])
        _, _, visual, answer = laid_out_document(np.zeros(n_tok, np.int64), spans, self.cfg, 0, 0, 0,
                                                 self._answer_flags(d, n_tok, kept))
        return visual, answer

    def _answer_flags(self, d: int, n_tok: int, kept: np.ndarray) -> np.ndarray:
        """Conversation d's loss mask: a flag per token, then per image extraction kept."""
        raw = np.asarray(self.loss_mask[d], np.uint8)
        return np.concatenate([raw[:n_tok], raw[n_tok:][kept]])

    # --- index -----------------------------------------------------------------------------

    def _doc_spans_and_kept(self, d: int):
        """(spans without the images extraction could not decode, which spans were kept)."""
        if self.spans is None:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        spans = np.asarray(self.spans[d], np.int64)
        if len(spans) % 3 or (len(spans) and (spans[0::3].min() < 0 or (spans[1::3] < spans[0::3]).any() or
                                              spans[1::3].max() > self.doc_tokens[d] or spans[2::3].min() < 0 or
                                              spans[2::3].max() >= max(self.num_images, 1))):
            raise self._disagree(f"{self.spans.prefix}.bin: document {d}'s image spans {spans.tolist()[:12]} lie "
                                 f"outside its {int(self.doc_tokens[d])} tokens or the {self.num_images} images")
        keep = np.ones(len(spans) // 3, bool)
        if len(self.dropped_images) and len(spans):
            keep = ~np.isin(spans[2::3], self.dropped_images)
            spans = spans.reshape(-1, 3)[keep].reshape(-1)
        return spans, keep

    def _index_key(self, num_samples) -> str:
        """Names the order caches after everything they depend on, the data's content
        fingerprints and document lengths included: a cache made from other data under this
        prefix is never read."""
        desc = {"version": INDEX_VERSION, "fingerprint": self.fingerprint,
                "dropped_images": hashlib.md5(np.asarray(self.dropped_images, np.int64).tobytes()).hexdigest(),
                "doc_tokens": checksum(self.doc_tokens),
                "doc_images": checksum(self.spans.lengths) if self.spans is not None else None,
                "docs": [int(self.documents[0]), int(self.documents[-1]) + 1], "seq_length": self.cfg.seq_length,
                "num_image_tokens": self.cfg.num_image_tokens, "max_images": self.cfg.max_images,
                "seed": self.cfg.seed, "num_samples": num_samples}
        if not self.cfg.pack_documents:
            desc["pack_documents"] = False
        if self.cfg.whole_documents:
            desc["whole_documents"] = True
        return hashlib.md5(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def _build(self, num_samples) -> Tuple[np.ndarray, np.ndarray]:
        """(document order, sample starts), from this dataset's spans without the dropped images."""
        spans = SpanTable.empty(self.text.num_documents) if self.spans is None else \
            SpanTable.from_indexed(self.spans, self.dropped_images, self.doc_tokens, self.num_images,
                                   f"{self.prefix}.bin")
        builder = SampleIndexBuilder(self.doc_tokens, spans, self.cfg)
        return build_order(builder, self.documents, self.cfg.seed, num_samples, self.prefix)

    def _load_or_build_index(self, num_samples, cache_dir):
        directory = cache_dir or os.path.dirname(os.path.abspath(self.prefix))
        cache = OrderCache(os.path.join(directory, f"{os.path.basename(self.prefix)}_{self._index_key(num_samples)}"))
        on_rank0(lambda: self._check_and_build(directory, cache, num_samples),
                 f"checking {self.prefix} and building its sample order")
        return cache.load(self.prefix)

    def _check_and_build(self, directory: str, cache: OrderCache, num_samples) -> None:
        """Rank 0: the content checks, then the order caches (re)built where they cannot be used."""
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise self._unwritable(directory, exc) from None
        self._check_content(directory)
        problem = cache.problem(self.documents, self.prefix)
        if problem is not None:
            if problem != "missing":
                print(f"note: sample-order cache {cache.base}_*.npy {problem}: rebuilding it", flush=True)
            order, starts = self._build(num_samples)
            shuffle = np.random.RandomState((self.cfg.seed + 1) % 2**32).permutation(len(starts) - 1)
            arrays = (order, starts, shuffle.astype(np.int64))
            try:
                for p, arr in zip(cache.paths, arrays):
                    _save_npy(p, arr)
                cache.write_record(arrays)
            except OSError as exc:   # e.g. a read-only data directory
                raise self._unwritable(directory, exc) from None

    def _unwritable(self, directory: str, exc: OSError) -> OutputError:
        return OutputError(f"{directory}: cannot write the sample-order cache of {self.prefix} "
                           f"({exc.strerror or exc}); pass --data-cache-path a writable directory")

    # --- samples ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.shuffle)

    def _get_doc(self, d: int):
        lo, hi = int(self.text.document_indices[d]), int(self.text.document_indices[d + 1])
        toks = self.text[lo] if hi - lo == 1 else np.concatenate([self.text[i] for i in range(lo, hi)])
        if len(toks):   # every read: a large .bin is never scanned whole at start-up
            top, bottom = int(toks.max()), int(toks.min())
            if top >= self.vocab or bottom < 0:
                raise self._id_error(top if top >= self.vocab else bottom, d)
        spans, kept = self._doc_spans_and_kept(d)
        mask = self._answer_flags(d, len(toks), kept) if self.loss_mask is not None else None
        return np.asarray(toks, np.int64), spans, mask

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not 0 <= i < len(self.shuffle):
            raise IndexError(f"sample {i} of a {len(self.shuffle)}-sample dataset ({self.prefix})")
        return self.sample_in_order(int(self.shuffle[i]))

    def sample_in_order(self, j: int) -> Dict[str, np.ndarray]:
        """The j-th sample of the stream before the sample shuffle."""
        return materialize(self.starts[j], self.starts[j + 1], self.doc_order, self._get_doc, self.features,
                           self.cfg, self.img_id, self.img_end_id, self.eod_id)


def build_train_valid_test(data_path: Sequence[str], split: str, cfg: PackingConfig,
                           num_samples: Tuple[int, int, int], cache_dir: Optional[str] = None):
    """Megatron's recipe: each prefix split into train/valid/test document ranges by --split,
    each part sized to its share of the blend (plus slack so rounding never runs short),
    then blended to exactly num_samples[i]. A part asked for 0 samples is None."""
    prefixes, weights = parse_blend(data_path)
    out = []
    for part, size in enumerate(num_samples):
        if not size:
            out.append(None)
            continue
        datasets = []
        for prefix, weight in zip(prefixes, weights):
            n_docs = IndexedDataset(prefix).num_documents
            lo, hi = split_ranges(split, n_docs)[part]
            if not n_docs:
                raise InputError(f"{prefix}: the dataset holds no documents (see the report in "
                                 f"{sidecar(prefix, 'meta')})")
            if hi <= lo:
                raise ConfigError(f"--split {split}: leaves none of the {n_docs} documents of {prefix} for the "
                                  f"{['train', 'valid', 'test'][part]} part")
            share = int(np.ceil(weight * size * 1.005)) + 1
            datasets.append(PackedDataset(prefix, cfg, share, (lo, hi), cache_dir))
        out.append(BlendedDataset(datasets, weights, size))
    return out

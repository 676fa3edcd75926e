"""Packed multimodal datasets, their cached sample order, blends and the resumable sampler.

Sample order is built once per (data, split, seq length, N, max images, seed, sample count)
and cached as ``.npy`` beside the data (or under ``--data-cache-path``): document order
(a fresh shuffle per epoch), sample starts, sample shuffle. With torch.distributed up, rank
0 builds while the others wait. ``dataset[i]`` depends only on i: any rank, any time.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_open
from .indexed import FeatureStore, IndexedDataError, IndexedDataset
from .packing import PackingConfig, materialize
from .sample_index import SampleIndexBuilder, SpanTable
from .preprocess import read_meta, sidecar
from .tokenizer import IMG, IMG_END

INDEX_VERSION = 2   # 2: keyed by content fingerprints


def split_weights(split: str) -> List[float]:
    """Megatron's --split "98,2,0" (or "98/2/0") as three weights, missing ones 0."""
    weights = [float(x) for x in split.replace("/", ",").split(",")]
    return weights + [0.0] * (3 - len(weights))


def split_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """Megatron's --split "98,2,0": contiguous document ranges for train/valid/test."""
    weights = split_weights(split)
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"--split {split!r}: weights must be non-negative with a positive sum")
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _is_rank0_and_barrier():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0, dist.barrier
    except ImportError:
        pass
    return True, lambda: None


def _save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


class PackedDataset:
    """Fixed-length packed samples from one preprocessed dataset prefix."""

    def __init__(self, prefix: str, cfg: PackingConfig, num_samples: Optional[int] = None,
                 doc_range: Optional[Tuple[int, int]] = None, cache_dir: Optional[str] = None,
                 require_features: bool = True):
        self.prefix, self.cfg = prefix, cfg
        meta = read_meta(prefix)
        ids = meta["tokenizer"].get("image_token_ids") or {}
        if IMG not in ids or IMG_END not in ids:
            raise ValueError(f"{prefix}.meta.json: tokenizer lacks the {IMG} / {IMG_END} special tokens; "
                             f"re-run tools/preprocess_data.py")
        self.img_id, self.img_end_id = ids[IMG], ids[IMG_END]
        self.eod_id = meta["tokenizer"].get("eod_id")
        self.text = IndexedDataset(prefix)
        self.multimodal = bool(meta["multimodal"])
        self.spans = IndexedDataset(sidecar(prefix, "images")) if self.multimodal else None
        # Instruction data: which tokens and images are answers (the only targets).
        self.loss_mask = IndexedDataset(sidecar(prefix, "loss_mask")) if meta.get("loss_mask") else None
        num_images = meta.get("num_images", 0)
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
        lo, hi = doc_range or (0, self.text.num_documents)
        self.documents = np.arange(lo, hi, dtype=np.int64)
        if not len(self.documents):
            raise ValueError(f"{prefix}: no documents in range {lo}:{hi}")
        self.doc_order, self.starts, self.shuffle = self._load_or_build_index(num_samples, cache_dir)

    # --- index -----------------------------------------------------------------------------

    def _doc_spans_and_kept(self, d: int):
        """(spans without the images extraction could not decode, which spans were kept)."""
        if self.spans is None:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        spans = np.asarray(self.spans[d], np.int64)
        keep = np.ones(len(spans) // 3, bool)
        if len(self.dropped_images) and len(spans):
            keep = ~np.isin(spans[2::3], self.dropped_images)
            spans = spans.reshape(-1, 3)[keep].reshape(-1)
        return spans, keep

    def _index_key(self, num_samples) -> str:
        """Names the order caches after everything they depend on, the data's content
        fingerprints included: a cache made from other data under this prefix is never read."""
        desc = {"version": INDEX_VERSION, "fingerprint": self.fingerprint,
                "dropped_images": hashlib.md5(np.asarray(self.dropped_images, np.int64).tobytes()).hexdigest(),
                "docs": [int(self.documents[0]), int(self.documents[-1]) + 1], "seq_length": self.cfg.seq_length,
                "num_image_tokens": self.cfg.num_image_tokens, "max_images": self.cfg.max_images,
                "seed": self.cfg.seed, "num_samples": num_samples}
        if not self.cfg.pack_documents:
            desc["pack_documents"] = False
        return hashlib.md5(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def _build(self, num_samples) -> Tuple[np.ndarray, np.ndarray]:
        """(document order, sample starts): a fresh shuffle of the documents per epoch, each
        epoch extending the starts of the ones before (sample_index.py, compiled)."""
        rng = np.random.RandomState(self.cfg.seed % 2**32)
        spans = SpanTable.empty(self.text.num_documents) if self.spans is None else \
            SpanTable.from_indexed(self.spans, self.dropped_images)
        builder = SampleIndexBuilder(self.doc_tokens, spans, self.cfg)
        parts: List[np.ndarray] = []
        while True:
            parts.append(rng.permutation(self.documents))
            if num_samples is None:
                # One epoch: the last, partial sample is dropped (its end is not a real start).
                builder.extend(parts[-1])
                return parts[-1], builder.starts.copy()
            builder.extend(parts[-1], num_samples + 1)
            if builder.finished:
                return np.concatenate(parts), builder.starts.copy()
            if len(parts) > 10_000:
                raise ValueError(f"{self.prefix}: cannot make {num_samples} samples (documents too short?)")

    def _load_or_build_index(self, num_samples, cache_dir):
        base = os.path.join(cache_dir or os.path.dirname(os.path.abspath(self.prefix)),
                            f"{os.path.basename(self.prefix)}_{self._index_key(num_samples)}")
        paths = [f"{base}_doc.npy", f"{base}_sample.npy", f"{base}_shuffle.npy"]
        is_rank0, barrier = _is_rank0_and_barrier()
        if is_rank0 and not all(os.path.isfile(p) for p in paths):
            os.makedirs(os.path.dirname(base), exist_ok=True)
            order, starts = self._build(num_samples)
            n = len(starts) - 1
            shuffle = np.random.RandomState((self.cfg.seed + 1) % 2**32).permutation(n).astype(np.int64)
            for p, arr in zip(paths, (order, starts, shuffle)):
                _save_npy(p, arr)
        barrier()
        try:
            order, starts, shuffle = (np.load(p, mmap_mode="r") for p in paths)
        except (OSError, ValueError) as exc:
            raise IndexedDataError(f"sample-order cache {base}_*.npy unreadable ({exc}); delete those files to "
                                   "rebuild them") from None
        lo, hi = int(self.documents[0]), int(self.documents[-1]) + 1
        if starts.ndim != 2 or starts.shape[1] != 2 or len(shuffle) != len(starts) - 1 or not len(order) or \
                int(order.min()) < lo or int(order.max()) >= hi or int(starts[-1, 0]) > len(order):
            raise IndexedDataError(f"sample-order cache {', '.join(paths)} does not fit {self.prefix} (documents "
                                   f"{lo}:{hi}, {len(order)} in the order, {len(starts)} sample starts, "
                                   f"{len(shuffle)} shuffled); delete those files to rebuild them")
        return order, starts, shuffle

    # --- samples ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.shuffle)

    def _get_doc(self, d: int):
        lo, hi = int(self.text.document_indices[d]), int(self.text.document_indices[d + 1])
        toks = self.text[lo] if hi - lo == 1 else np.concatenate([self.text[i] for i in range(lo, hi)])
        spans, kept = self._doc_spans_and_kept(d)
        mask = None
        if self.loss_mask is not None:
            raw = np.asarray(self.loss_mask[d], np.uint8)
            mask = np.concatenate([raw[:len(toks)], raw[len(toks):][kept]])
        return np.asarray(toks, np.int64), spans, mask

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        if not 0 <= i < len(self.shuffle):
            raise IndexError(f"sample {i} of a {len(self.shuffle)}-sample dataset ({self.prefix})")
        return self.sample_in_order(int(self.shuffle[i]))

    def sample_in_order(self, j: int) -> Dict[str, np.ndarray]:
        """The j-th sample of the stream before the sample shuffle."""
        return materialize(self.starts[j], self.starts[j + 1], self.doc_order, self._get_doc, self.features,
                           self.cfg, self.img_id, self.img_end_id, self.eod_id)


def parse_blend(data_path: Sequence[str], flag: str = "--data-path", item: str = "prefix"
                ) -> Tuple[List[str], List[float]]:
    """Megatron's blend syntax, 'A' or '0.5 A 0.3 B 0.2 C': (names, normalised weights)."""
    items = list(data_path)
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise ValueError(f"{flag} {' '.join(items)}: expected weight/{item} pairs")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"{flag} {' '.join(items)}: expected weight/{item} pairs") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{flag}: weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return items[1::2], [w / total for w in weights]


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
            if hi <= lo:
                raise ValueError(f"{prefix}: --split {split} leaves no documents for the "
                                 f"{['train', 'valid', 'test'][part]} part")
            share = int(np.ceil(weight * size * 1.005)) + 1
            datasets.append(PackedDataset(prefix, cfg, share, (lo, hi), cache_dir))
        out.append(BlendedDataset(datasets, weights, size))
    return out


class BlendedDataset:
    """Interleaves datasets so that every prefix of the order matches the weights as closely
    as possible (sample m of dataset j sits at key (m + 0.5) / w_j)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        keys, owner, local = [], [], []
        for j, (ds, w) in enumerate(zip(datasets, weights)):
            if w <= 0:
                continue
            m = np.arange(int(np.ceil(w * size)) + 1)
            keys.append((m + 0.5) / w)
            owner.append(np.full(len(m), j))
            local.append(m)
        keys, owner, local = np.concatenate(keys), np.concatenate(owner), np.concatenate(local)
        order = np.argsort(keys, kind="stable")[:size]
        self.dataset_index, self.sample_index = owner[order], local[order]
        self.datasets = list(datasets)

    def __len__(self):
        return len(self.dataset_index)

    def __getitem__(self, i):
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


class PretrainingSampler:
    """Micro-batches of dataset indices for one data-parallel rank, starting after
    `consumed_samples`: global batch g covers indices [g*B, (g+1)*B) with B = micro x dp,
    and rank r takes its slice. The global order is the same for any dp size, so a resumed
    run (any dp) continues with exactly the next samples."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside [0, {dp_size})")
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.dp = micro_batch_size, dp_rank, dp_size

    def __len__(self):
        return (self.total - self.consumed) // (self.micro * self.dp)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro * self.dp
        for g in range(self.consumed, self.total - step + 1, step):
            yield list(range(g + self.rank * self.micro, g + (self.rank + 1) * self.micro))


def collate(samples: List[Dict[str, np.ndarray]]):
    """Stacks numpy samples into torch tensors."""
    import torch
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.as_tensor(np.stack(values)) if isinstance(values[0], np.ndarray) else torch.tensor(values)
    return out

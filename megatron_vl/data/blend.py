"""Blends and splits (Megatron's syntax): the weighted prefixes of --data-path, the
train/valid/test document ranges of --split, and the dataset that interleaves a blend.
build_train_valid_test (dataset.py) puts them together."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..config import ConfigError, split_weights


def split_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """Megatron's --split "98,2,0": contiguous document ranges for train/valid/test."""
    weights = split_weights(split)
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_blend(data_path: Sequence[str], flag: str = "--data-path", item: str = "prefix"
                ) -> Tuple[List[str], List[float]]:
    """Megatron's blend syntax, 'A' or '0.5 A 0.3 B 0.2 C': (names, normalised weights)."""
    items = list(data_path)
    form = f"expected one {item}, or weight/{item} pairs such as '0.7 A 0.3 B'"
    if not items:
        raise ConfigError(f"{flag} is empty: {form}")
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise ConfigError(f"{flag} {' '.join(items)}: {form}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ConfigError(f"{flag} {' '.join(items)}: {form}") from None
    if any(not 0 <= w < float("inf") for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{flag}: weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return items[1::2], [w / total for w in weights]


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

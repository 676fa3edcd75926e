"""What feeds the data loader: the resumable sampler of one data-parallel rank, and the
collate function that stacks samples into tensors."""

from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np


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

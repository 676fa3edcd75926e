"""Image-text pairs streamed from img2dataset webdataset shards, for stage 1.

- Sources: one or more shard patterns (``'cc3m/{00000..00331}.tar'``, braces expanded) with
  blend weights; each source loops over epochs forever.
- Per rank: in epoch e of a source, its shards are permuted by (seed, source, e) and rank r of
  W reads shards r, r + W, ...; a shuffle buffer (RNG seeded by seed, source, epoch, rank)
  mixes samples across them. Sources are interleaved by the same weighted rule as
  ``BlendedDataset`` (sample m of source j at key (m + 0.5) / w_j).
- Resumable by samples consumed: the order depends only on the seed, the shard lists and
  the rank, so ``samples(skip=n)`` replays the stream without decoding the first n images and
  continues exactly where a run that consumed n stopped.
- Bad data is never fatal: a damaged tar (read up to the damage), a pair without caption or
  image, a caption that is not UTF-8 and an image that does not decode are counted in the
  ``Report`` under their reason, with the first place seen.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .formats import Report, read_wds_pairs


@dataclass
class Pair:
    position: int     # in this rank's stream: samples(skip=position + 1) continues after it
    where: str        # shard:key
    image: object     # PIL RGB image
    caption: str


def expand_shards(pattern: str) -> List[str]:
    """'dir/{00000..00003}.tar' -> the four names (brace syntax, as webdataset and img2dataset)."""
    from braceexpand import braceexpand
    return list(braceexpand(pattern))


def parse_sources(spec: Sequence[str]) -> Tuple[List[List[str]], List[float]]:
    """--train-shards 'A' or '0.7 A 0.3 B' (Megatron's blend syntax) -> shard lists, weights."""
    from .dataset import parse_blend
    patterns, weights = parse_blend(spec, "--train-shards", "pattern")
    return [expand_shards(p) for p in patterns], weights


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k % 2**32 for k in key]))


class PairStream:
    def __init__(self, sources: Sequence[Sequence[str]], weights: Sequence[float], rank: int = 0, world: int = 1,
                 seed: int = 1234, shuffle_buffer: int = 1000, report: Optional[Report] = None):
        for shards in sources:
            if len(shards) < world:
                raise ValueError(f"{len(shards)} shard(s) ({shards[0] if shards else 'none'} ...) for {world} data-"
                                 f"parallel ranks: each rank needs at least one shard of every source")
        self.sources, self.weights = [list(s) for s in sources], list(weights)
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, max(1, shuffle_buffer)
        self.report = report if report is not None else Report()

    def _raw(self, j: int) -> Iterator[Tuple[str, bytes, str]]:
        """(where, image bytes, caption) of source j for this rank, shuffled, over epochs."""
        for epoch in itertools.count():
            shards = self.sources[j]
            order = _rng(self.seed, j, epoch).permutation(len(shards))
            mine = [shards[i] for i in order[self.rank::self.world]]
            rng = _rng(self.seed, j, epoch, self.rank, 1)
            buffer: List[Tuple[str, bytes, str]] = []
            read_any = False
            for shard in mine:
                for doc in read_wds_pairs(shard, self.report, strict=False):
                    read_any = True
                    item = (doc.source, doc.images[0][1].data, doc.sentences[0])
                    if len(buffer) < self.buffer:
                        buffer.append(item)
                        continue
                    i = int(rng.integers(len(buffer)))
                    buffer[i], item = item, buffer[i]
                    yield item
            for i in rng.permutation(len(buffer)):
                yield buffer[i]
            if not read_any:
                raise ValueError(f"no readable pair in this rank's shards of source {j} ({mine[0]} ...)")

    def _blend(self) -> Iterator[Tuple[str, bytes, str]]:
        streams = [self._raw(j) for j in range(len(self.sources))]
        taken = [0] * len(streams)
        while True:
            j = min((i for i, w in enumerate(self.weights) if w > 0),
                    key=lambda i: ((taken[i] + 0.5) / self.weights[i], i))
            taken[j] += 1
            yield next(streams[j])

    def samples(self, skip: int = 0) -> Iterator[Pair]:
        """This rank's pairs from position `skip` of its stream on (images decoded to RGB; a
        pair whose image does not decode is counted and passed over, and still counts as a
        position, so every run agrees on what position n is)."""
        from PIL import Image
        for position, (where, data, caption) in enumerate(itertools.islice(self._blend(), skip, None), skip):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    image = im.convert("RGB")
            except Exception:
                self.report.skip("image unreadable", where)
                continue
            yield Pair(position, where, image, caption)

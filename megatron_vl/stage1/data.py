"""Stage 1's micro-batches: image-text pairs from this rank's webdataset stream, the CLIP
pixels the tokenizer reads and the targets (on the fly, or from the precomputed stores).

Decoding, both image processors and store reads run in one background thread, a few
micro-batches ahead (--prefetch); each batch carries the stream position after it, so the
position the trainer saves is that of the last batch it trained on and a resumed run
continues exactly there. The frozen encoders of the on-the-fly path run in the trainer's
thread, on its device.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Dict, Iterator, Optional

import torch

from ..data.formats import Report
from ..errors import InputError
from ..data.pair_stream import PairStream


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _background(make: Callable[[], Iterator], depth: int) -> Iterator:
    """Runs `make()` in a daemon thread, `depth` items ahead; re-raises its errors here."""
    q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    done = object()

    def work():
        try:
            for item in make():
                q.put(item)
            q.put(done)
        except BaseException as exc:   # noqa: B902 - handed to the consumer
            q.put(_Failed(exc))

    threading.Thread(target=work, daemon=True, name="stage1-data").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, _Failed):
            raise item.exc
        yield item


def check_shards(sources) -> None:
    """A typo in --train-shards is not a damaged shard: one line naming the missing ones."""
    missing = [s for shards in sources for s in shards if not os.path.isfile(s)]
    if missing:
        raise InputError(f"--train-shards: {len(missing)} shard(s) do not exist: {', '.join(missing[:3])}"
                         + (" ..." if len(missing) > 3 else ""))


class PairBatches:
    """Micro-batches of `micro` pairs from position `skip` of this rank's stream."""

    def __init__(self, stream: PairStream, micro: int, clip_processor, encoders=None, store=None,
                 device: Optional[torch.device] = None, dtype=torch.float32, prefetch: int = 2):
        if (encoders is None) == (store is None):
            raise ValueError("targets come from the encoders or from a store: exactly one of them")
        check_shards(stream.sources)
        self.stream, self.micro, self.processor = stream, micro, clip_processor
        self.encoders, self.store = encoders, store
        self.device, self.dtype, self.prefetch = device or torch.device("cpu"), dtype, prefetch

    @property
    def report(self) -> Report:
        return self.stream.report

    def _prepared(self, skip: int) -> Iterator[Dict]:
        pairs = self.stream.samples(skip)
        while True:
            try:
                chunk = [next(pairs) for _ in range(self.micro)]
            except ValueError as exc:   # the stream found nothing readable in this rank's shards
                raise InputError(f"--train-shards: {exc}{self._skips()}") from None
            images, captions = [p.image for p in chunk], [p.caption for p in chunk]
            batch = {"pixels": self.processor(images=images, return_tensors="pt")["pixel_values"],
                     "position": chunk[-1].position + 1, "where": [p.where for p in chunk]}
            if self.store is not None:
                batch["image_targets"], batch["text_targets"] = self.store(batch["where"])
            else:
                batch["ip_pixels"], batch["token_ids"] = self.encoders.inputs(images, captions)
            yield batch

    def _skips(self) -> str:
        r = self.stream.report
        if not r.skipped:
            return ""
        return " (skipped: " + "; ".join(f"{reason}: {n}, first at {r.first_seen[reason]}"
                                         for reason, n in sorted(r.skipped.items())) + ")"

    def __call__(self, skip: int) -> Iterator[Dict]:
        """Yields model-ready batches (tensors on the device) with 'position' and 'where'."""
        for batch in _background(lambda: self._prepared(skip), self.prefetch):
            if self.encoders is not None:
                batch["image_targets"], batch["text_targets"] = self.encoders(batch.pop("ip_pixels"),
                                                                              batch.pop("token_ids"))
            batch["pixels"] = batch["pixels"].to(self.device, self.dtype)
            for key in ("image_targets", "text_targets"):
                batch[key] = batch[key].to(self.device)
            yield batch

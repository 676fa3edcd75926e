"""One rank's part of feature extraction: its shards' images decoded and preprocessed in
DataLoader workers, the image tokenizer's forward over fixed batches (autocast on CUDA), each
shard written under a temporary name and renamed when complete.

The output is byte-identical whatever the rank and worker counts: shards are fixed row ranges
of the image table (the shard size), batches are fixed row ranges inside a shard (the batch
size, counted from the shard's first row), and the loader yields them in order. A forward's
numerics may depend on its batch (a kernel can block a matmul differently for another batch
shape), so the rows of a batch decide its features, never which rank or worker handled it.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..errors import UsageError
from .indexed import FeatureStoreWriter, IndexedDataset

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_DEFAULT_WORKERS = 8


class Shard(NamedTuple):
    prefix: str    # where the shard's store is written (a FeatureStore of end - start blocks)
    start: int     # first image-table row
    end: int       # one past the last


def shard_ranges(total: int, shard_size: int) -> List[Tuple[int, int]]:
    """The fixed row ranges [start, end) of a table of `total` rows: the same for any rank count,
    so a rerun with another count finds the shards an earlier run finished."""
    return [(s, min(s + shard_size, total)) for s in range(0, total, shard_size)]


def default_workers(device: str) -> int:
    """Decoding workers per rank: on CUDA the cores of this process's share of the node (one
    rank per GPU) less the one that drives the GPU, at most MAX_DEFAULT_WORKERS; on CPU one
    (the forward's threads take the other cores)."""
    if not str(device).startswith("cuda"):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cpus = os.cpu_count() or 2
    per_rank = cpus // max(1, torch.cuda.device_count())
    return max(1, min(MAX_DEFAULT_WORKERS, per_rank - 1))


def autocast_dtype(name: Optional[str], device: str) -> Tuple[Optional[torch.dtype], str]:
    """(the dtype the forward autocasts to, None for plain fp32; a note to print once, or "").
    Default: bf16 on CUDA (its range is fp32's: no overflow into the float16 store's inf),
    fp32 on CPU, where autocast is not used."""
    if name is not None and name not in DTYPES:
        raise UsageError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    if not str(device).startswith("cuda"):
        note = "" if name in (None, "fp32") else \
            f"note: --dtype {name} applies on CUDA; on {device} the features are computed in fp32"
        return None, note
    chosen = DTYPES[name or "bf16"]
    return (None if chosen is torch.float32 else chosen), ""


def decode_image(data: np.ndarray):
    from PIL import Image
    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.convert("RGB")


class DecodedBatches(torch.utils.data.Dataset):
    """Item i: the pixels of batch i's images that decode (None when none does), a flag per
    row of the batch (decoded or not), and {row: reason} for those that did not. Runs in the
    DataLoader's workers; each opens the image table itself (a memory map is not sent)."""

    def __init__(self, table_prefix: str, processor, batches: List[Tuple[int, int]]):
        self.table_prefix, self.processor, self.batches = table_prefix, processor, batches
        self._table: Optional[IndexedDataset] = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getstate__(self):
        return {**self.__dict__, "_table": None}

    def __getitem__(self, i: int):
        if self._table is None:
            self._table = IndexedDataset(self.table_prefix)
        start, end = self.batches[i]
        images, ok, errors = [], [], {}
        for row in range(start, end):
            try:
                images.append(decode_image(self._table[row]))
                ok.append(True)
            except Exception as exc:   # PIL raises OSError, ValueError, SyntaxError, ...
                errors[row] = f"{type(exc).__name__}: {exc}"
                ok.append(False)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        return pixels, ok, errors


def _as_is(item):
    return item


def _forward(model, pixels: torch.Tensor, device: str, dtype: Optional[torch.dtype]) -> np.ndarray:
    x = pixels.to(device, non_blocking=True)
    cast = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), cast:
        out = model(x)
    # float16 on the device: half the copy back, the same rounding (IEEE nearest-even) as numpy's
    return out.to(torch.float16).cpu().numpy()


class RunSettings(NamedTuple):
    batch_size: int
    device: str
    dtype: Optional[torch.dtype]   # autocast dtype (autocast_dtype); None: fp32
    workers: int                   # DataLoader workers (0: decode in this process)
    stop_after_shards: Optional[int] = None   # test hook: SIGKILL after this many shards (see write_shards)


class ShardsWritten(NamedTuple):
    undecodable: Dict[int, str]   # {table row: reason} for the images that did not decode
    forward_seconds: float        # in the forward (its results copied back to the host)
    seconds: float                # the whole loop: waiting for decoded batches, forward, writes


def write_shards(model, processor, table_prefix: str, shards: List[Shard], source: str, run: RunSettings,
                 on_batch: Callable[[int], None] = lambda n: None,
                 on_shard: Callable[[], None] = lambda: None) -> ShardsWritten:
    """Computes and writes `shards` in order (each renamed into place when complete; a failure
    removes the unfinished one's temporary files). on_batch(images) after each batch,
    on_shard() after each shard (on_shard's own time is not counted in `seconds`: it is the
    wait for the other ranks).

    run.stop_after_shards = k: after k shards and one batch of the next, this process kills
    itself (SIGKILL, no clean-up): the test of a run killed mid-way, whose next run must
    remove the dead writer's temporary files and compute from shard k on."""
    batches = [(pos, b, min(b + run.batch_size, s.end)) for pos, s in enumerate(shards)
               for b in range(s.start, s.end, run.batch_size)]
    # A worker only helps while another batch is computed: with b batches, b - 1 at most. A
    # daemon process (a multiprocessing pool's or test harness's rank) may not start any.
    workers = 0 if multiprocessing.current_process().daemon else max(0, min(run.workers, len(batches) - 1))
    cuda = str(run.device).startswith("cuda")
    loader = torch.utils.data.DataLoader(DecodedBatches(table_prefix, processor, [(b, e) for _, b, e in batches]),
                                         batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                                         pin_memory=cuda, prefetch_factor=4 if workers else None)
    shape = (model.cfg.num_tokens, model.cfg.embed_dim)
    bad: Dict[int, str] = {}
    writer, finished, forward, waited = None, 0, 0.0, 0.0
    began = time.perf_counter()
    try:
        for (pos, start, end), (pixels, ok, errors) in zip(batches, loader):
            if writer is None:
                writer = FeatureStoreWriter(shards[pos].prefix, *shape, source=source)
            t0 = time.perf_counter()
            feats = _forward(model, pixels, run.device, run.dtype) if pixels is not None else None
            forward += time.perf_counter() - t0
            if all(ok):
                writer.add(feats)
            else:   # table order: a zero block, recorded, where the image did not decode
                it = iter(feats if feats is not None else ())
                for decoded in ok:
                    if decoded:
                        writer.add(next(it))
                    else:
                        writer.add_bad()
            bad.update(errors)
            on_batch(end - start)
            if end == shards[pos].end:
                writer.finalize()
                writer, finished = None, finished + 1
                t0 = time.perf_counter()
                on_shard()
                waited += time.perf_counter() - t0
            elif run.stop_after_shards is not None and finished >= run.stop_after_shards:
                os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return ShardsWritten(bad, forward, time.perf_counter() - began - waited)

"""Feature extraction over a dataset's image table, in resumable shards, by one process or by
every rank of a launch (torchrun, deepspeed, srun: the process group is the caller's).

Rank 0 takes the prefix's lock, removes temporary files dead writers left, and finds the shards
an earlier run finished; the others are dealt round-robin to the ranks (shard i of the
unfinished list to rank i mod world). Each round of shards ends in a small all-reduce (the
cluster's progress for rank 0's bar, and the place where a dead rank is noticed within the
process group's timeout). When all are written, rank 0 merges them into the store, gathers
every rank's undecodable images and reports them. Shards are fixed row ranges named by their
rows, so a rerun with any rank count and the same --shard-size reuses what an earlier run wrote.

The store (and each resumable shard) records the fingerprint of the image table it was
computed from: a shard left by a run over other data is recomputed, never reused. An image
that does not decode gets a zero block recorded as undecodable; the dataset reader drops
that image's block from every layout, and the run reports each such row with its document.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..atomic import remove_stale_temps
from ..errors import UsageError, UserError
from .extraction import RunSettings, Shard, autocast_dtype, default_workers, shard_ranges, write_shards
from .indexed import FeatureStore, FeatureStoreWriter, IndexedDataError, IndexedDataset, idx_path
from .preprocess import prefix_lock, read_meta, sidecar, table_fingerprint
from .rank0 import distributed, on_rank0

MERGE_CHUNK_BYTES = 64 << 20   # the merge copies shards through memory this much at a time


class ExtractionResult(NamedTuple):
    count: int
    shape: Tuple[int, int]
    undecodable: List[str]     # "table row R (document D): reason" for each image that did not decode
    computed_shards: int = 0   # shards this run computed (all ranks)
    reused_shards: int = 0     # shards an earlier run had finished
    # The lowest, over the ranks that computed shards, of the share of their time spent in the
    # forward (None: nothing computed), and that rank's seconds of computing. Well below 1 over
    # a long run: decoding or reading images held the forward back.
    forward_share: Optional[float] = None
    compute_seconds: float = 0.0


class _Plan(NamedTuple):
    source: str               # the image table's fingerprint
    total: int                # its rows
    todo: List[int]           # the shards still to compute (positions in _shards' list)


def _shards(prefix: str, total: int, shard_size: int) -> List[Shard]:
    """Every shard of the table, in row order (each rank makes the list: nothing to send)."""
    base = sidecar(prefix, "features")
    return [Shard(f"{base}.rows{s:012d}-{e:012d}", s, e) for s, e in shard_ranges(total, shard_size)]


def _is_shard_file(features: str, name: str) -> bool:
    """Whether `name` (in the store's folder) is a shard of `features`: ours, or one named by its
    index as earlier versions did."""
    tail = name[len(os.path.basename(features)):] if name.startswith(os.path.basename(features)) else ""
    return re.fullmatch(r"\.(rows\d+-\d+|shard\d{5})\.(bin|idx)", tail) is not None


def image_documents(prefix: str, rows: np.ndarray) -> dict:
    """The document each image-table row belongs to (from the _images sidecar, whose
    document d is one flat sequence of (start, end, image) triples)."""
    spans = IndexedDataset(sidecar(prefix, "images"))
    image_ids = spans._bin[2::3]
    where = np.flatnonzero(np.isin(image_ids, rows))
    element = where * 3 + 2
    docs = np.searchsorted(spans.pointers // 8, element, side="right") - 1
    return dict(zip(image_ids[where].tolist(), docs.tolist()))


def _valid_shard(shard: Shard, source: str, shape: Tuple[int, int], present: set) -> bool:
    if os.path.basename(idx_path(shard.prefix)) not in present:
        return False
    try:
        return FeatureStore(shard.prefix, expected_count=shard.end - shard.start, source=source).shape == shape
    except IndexedDataError:
        return False   # damaged, or from other data: recompute it


def _plan(prefix: str, shape: Tuple[int, int], shard_size: int) -> _Plan:
    # A run killed mid-shard (kill -9, OOM) left its shard's temporary files: ours to clean.
    features = sidecar(prefix, "features")
    folder = os.path.dirname(features) or "."
    remove_stale_temps(folder, prefix=os.path.basename(features) + ".")
    source = table_fingerprint(prefix, read_meta(prefix))
    total = len(IndexedDataset(sidecar(prefix, "table")))
    present = set(os.listdir(folder))   # one listing, not a stat per shard (140k of them on full MMC4)
    todo = [i for i, s in enumerate(_shards(prefix, total, shard_size)) if not _valid_shard(s, source, shape, present)]
    return _Plan(source, total, todo)


def _merge(prefix: str, plan: _Plan, shards: List[Shard], shape: Tuple[int, int]) -> None:
    """The shards, in row order, into one store (their undecodable rows renumbered); a chunk
    at a time, so the merge's memory does not grow with the shard size. Then the shards go,
    with any left by a run of another --shard-size."""
    features = sidecar(prefix, "features")
    out = FeatureStoreWriter(features, *shape, source=plan.source)
    chunk = max(1, MERGE_CHUNK_BYTES // (shape[0] * shape[1] * 2))
    try:
        for shard in shards:
            store = FeatureStore(shard.prefix, expected_count=shard.end - shard.start, source=plan.source)
            out.bad_rows.extend(int(r) + out.count for r in store.bad_rows)
            for i in range(0, store.count, chunk):
                out.add(store.features[i:i + chunk])
        out.finalize()
    except BaseException:
        out.abort()
        raise
    folder = os.path.dirname(features) or "."
    for name in os.listdir(folder):
        if _is_shard_file(features, name):
            os.remove(os.path.join(folder, name))


def _report(prefix: str, plan: _Plan, reasons: Dict[int, str]) -> List[str]:
    rows = FeatureStore(sidecar(prefix, "features"), source=plan.source).bad_rows
    docs = image_documents(prefix, rows) if len(rows) else {}
    return [f"{sidecar(prefix, 'table')}.bin row {r} (document {docs.get(r, '?')}): "
            f"{reasons.get(r, 'undecodable in an earlier run')}" for r in rows.tolist()]


def _from_rank0(dist, work: Callable, what: str):
    """work() on rank 0, its value (or its error) on every rank."""
    box = [None]

    def run():
        box[0] = work()
    on_rank0(run, what)
    if dist is not None:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class RankLost(UserError):
    """A rank did not reach the end of a round of shards (it died, or hung past the timeout)."""


def _sum_over_ranks(dist, value: int, prefix: str) -> int:
    """value summed over the ranks: the end of a round of shards, where every rank must arrive."""
    if dist is None:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(t)
        return int(t.item())
    except RuntimeError as exc:   # gloo: a peer's connection reset, or the group's timeout
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankLost(f"{prefix}: rank {dist.get_rank()}: another rank did not finish its round of shards "
                       f"(it died, or took longer than the process group's timeout, --timeout-minutes): "
                       f"{first[:300]}; the finished shards are kept: run again, with any number of ranks, "
                       "to resume") from None


@torch.no_grad()
def extract_features(prefix: str, model, processor, batch_size: int = 64, shard_size: int = 4096,
                     device: str = "cpu", progress: Optional[Callable] = None, *, dtype: Optional[str] = None,
                     workers: Optional[int] = None, stop_after_shards: Optional[int] = None) -> ExtractionResult:
    """Writes ``{prefix}_image_features`` (one [N, d] float16 block per image-table row), with
    every rank of the process group if there is one (all call this with the same arguments).
    Finished shards survive an interruption and are not recomputed. dtype: bf16 | fp16 | fp32
    autocast on CUDA (default bf16 there, fp32 on CPU); workers: decoding processes per rank
    (default: extraction.default_workers); progress: a tqdm-like class, shown on rank 0;
    stop_after_shards: a test hook (extraction.write_shards)."""
    for name, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise UsageError(f"{name} {value}: must be a positive number of images")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers {workers}: must be 0 (decode in this process) or more")
    run = RunSettings(batch_size, device, autocast_dtype(dtype, device)[0],
                      default_workers(device) if workers is None else workers, stop_after_shards)
    dist = distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    shape = (model.cfg.num_tokens, model.cfg.embed_dim) if model is not None else (0, 0)
    with contextlib.ExitStack() as held:
        def plan_on_rank0():
            held.enter_context(prefix_lock(prefix))   # held by rank 0 for the whole run, for every rank
            return _plan(prefix, shape, shard_size)
        plan = _from_rank0(dist, plan_on_rank0, f"planning the extraction of {prefix}")
        features = sidecar(prefix, "features")
        shards = _shards(prefix, plan.total, shard_size)
        if rank != 0:   # the dead writers of this host (rank 0 cleaned its own)
            remove_stale_temps(os.path.dirname(features) or ".", prefix=os.path.basename(features) + ".")
        mine = [shards[i] for i in plan.todo[rank::world]]
        rounds = -(-len(plan.todo) // world)
        bar = None
        if progress is not None and rank == 0:
            done = plan.total - sum(shards[i].end - shards[i].start for i in plan.todo)
            bar = progress(total=plan.total, initial=done, desc=f"features {os.path.basename(prefix)}", unit="img")
        own = [0]   # images this rank computed in the current round

        def on_batch(n: int) -> None:
            own[0] += n
            if bar is not None:
                bar.update(n)

        def end_round() -> None:
            everyone = _sum_over_ranks(dist, own[0], prefix)
            if bar is not None:
                bar.update(everyone - own[0])   # the other ranks' images of the round
            own[0] = 0
        written = write_shards(model, processor, sidecar(prefix, "table"), mine, plan.source, run, on_batch,
                               end_round if world > 1 else (lambda: None))
        reasons = written.undecodable
        busy = (written.forward_seconds / written.seconds, written.seconds) if mine and written.seconds > 0 else None
        for _ in range(rounds - len(mine) if world > 1 else 0):   # the last round, where this rank had no shard
            end_round()
        if bar is not None:
            bar.close()
        if dist is not None:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object((reasons, busy), gathered, dst=0)
            if rank == 0:
                reasons = {row: why for part, _ in gathered for row, why in part.items()}
                busy = min((b for _, b in gathered if b is not None), default=None)

        def merge_on_rank0():
            _merge(prefix, plan, shards, shape)
            return ExtractionResult(plan.total, shape, _report(prefix, plan, reasons), len(plan.todo),
                                    len(shards) - len(plan.todo), *(busy or (None, 0.0)))
        return _from_rank0(dist, merge_on_rank0, f"merging the feature store of {prefix}")

"""Training checkpoints: DeepSpeed's engine state plus ours, committed by the ``latest`` marker.

Layout of ``--save DIR``: ``DIR/iter_0000100/`` holds DeepSpeed's files (model, optimizer and
scheduler state; client state = iteration, consumed samples, skipped-step counters, the
resolved config), ``rng/rank_XXXXX.pt`` (every RNG of each rank: python, numpy, torch, CUDA,
the TP tracker) and ``config.yaml``. ``DIR/latest`` names the newest complete one and is
written last, atomically, after every rank has finished writing: a save killed half-way
leaves ``latest`` on the previous checkpoint.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_open, temp_name
from ..config import save_yaml
from ..convert.hf import CheckpointError
from ..parallel.random import RNGStatesTracker
from . import faults

LATEST = "latest"
_TAG = re.compile(r"iter_(\d{7,})$")


def tag_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state(tracker: Optional[RNGStatesTracker]) -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tracker.state_dict() if tracker is not None else None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any], tracker: Optional[RNGStatesTracker]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and state.get("tracker") is not None:
        tracker.load_state_dict(state["tracker"])


def read_latest(load_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(load_dir, LATEST)) as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def is_release(load_dir: str) -> bool:
    """A release checkpoint (tools/convert_checkpoint.py import-hf): weights only."""
    return read_latest(load_dir) == "release"


STAGE_FILE = "stage.json"


def write_stage(tag_dir: str, stage: str) -> None:
    import json
    with atomic_open(os.path.join(tag_dir, STAGE_FILE)) as fh:
        json.dump({"stage": stage}, fh)


def read_stage(load_dir: str, ckpt_step: Optional[int] = None) -> Optional[str]:
    """The stage that wrote the checkpoint --load names ('pretrain', 'instruct'), None when
    unrecorded (written before stages were recorded: pretraining) or absent."""
    import json
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None or tag == "release":
        return None
    try:
        with open(os.path.join(load_dir, tag, STAGE_FILE)) as fh:
            return json.load(fh).get("stage")
    except (OSError, ValueError):
        return None


def save_checkpoint(engine, cfg, save_dir: str, iteration: int, client_state: Dict[str, Any],
                    tracker: Optional[RNGStatesTracker], keep_last: Optional[int] = None,
                    log: Callable[[str], None] = print,
                    before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Writes checkpoint `iteration` on every rank; `before_commit(tag_dir)` (every rank)
    adds files to it before ``latest`` names it."""
    tag = tag_name(iteration)
    rank = _rank()
    client = dict(client_state, iteration=iteration, config=cfg.to_dict())
    engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
    rng_dir = os.path.join(save_dir, tag, "rng")
    os.makedirs(rng_dir, exist_ok=True)
    path = os.path.join(rng_dir, f"rank_{rank:05d}.pt")
    tmp = temp_name(path)
    torch.save(rng_state(tracker), tmp)
    os.replace(tmp, path)
    if rank == 0:
        save_yaml(cfg, os.path.join(save_dir, tag, "config.yaml"))
    if before_commit is not None:
        before_commit(os.path.join(save_dir, tag))
    faults.maybe_kill_during_save(iteration)
    _barrier()   # every rank's files are complete before the marker moves
    if rank == 0:
        with atomic_open(os.path.join(save_dir, LATEST)) as fh:
            fh.write(tag)
        if keep_last:
            prune(save_dir, keep_last, log)
    _barrier()
    return tag


def prune(save_dir: str, keep_last: int, log: Callable[[str], None] = print) -> None:
    """Removes all but the newest keep_last checkpoints (never the one `latest` names)."""
    latest = read_latest(save_dir)
    tags = sorted((int(m.group(1)), name) for name in os.listdir(save_dir)
                  if (m := _TAG.match(name)) and os.path.isdir(os.path.join(save_dir, name)))
    for _, name in tags[:-keep_last]:
        if name != latest:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            log(f"removed old checkpoint {os.path.join(save_dir, name)} (--keep-last {keep_last})")


def _expected_files(engine, load_dir: str, tag: str):
    """The files this rank's engine will read: its model states and, under ZeRO, its
    optimizer partition (DeepSpeed's own naming, bf16_ prefix or not)."""
    files = []
    try:
        files.append([engine._get_ckpt_name(load_dir, tag)])
        if engine.zero_optimization():
            name = engine._get_zero_ckpt_name(load_dir, tag)
            base = os.path.basename(name)
            other = base[len("bf16_"):] if base.startswith("bf16_") else "bf16_" + base
            files.append([name, os.path.join(os.path.dirname(name), other)])
    except AttributeError:   # a DeepSpeed without these helpers: the readability scan still runs
        pass
    return files


def check_checkpoint_files(engine, load_dir: str, tag: str) -> None:
    """Names a missing or unreadable file before DeepSpeed meets it (where it would fail in
    an assertion, or in an unpickling error naming no file)."""
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"{load_dir}: checkpoint {tag} does not exist")
    for alternatives in _expected_files(engine, load_dir, tag):
        if not any(os.path.isfile(f) for f in alternatives):
            raise CheckpointError(f"{path}: incomplete checkpoint: {os.path.basename(alternatives[0])} is missing "
                                  f"(this rank's {'model' if 'model_states' in alternatives[0] else 'optimizer'} "
                                  "state); resume from an earlier checkpoint with --ckpt-step")
    for f in sorted(glob.glob(os.path.join(path, "**", "*.pt"), recursive=True)):
        # torch.save writes a zip archive: one that is not (cut short, overwritten) fails here by name.
        if not zipfile.is_zipfile(f):
            raise CheckpointError(f"{f}: unreadable checkpoint file ({os.path.getsize(f)} bytes, not a torch.save "
                                  "archive: truncated or overwritten?); resume from an earlier checkpoint with "
                                  "--ckpt-step")


def load_checkpoint(engine, load_dir: str, ckpt_step: Optional[int], tracker: Optional[RNGStatesTracker],
                    log: Callable[[str], None] = print, fresh_start_ok: bool = False) -> Optional[Dict[str, Any]]:
    """Restores engine and RNG state; returns the client state, or None when load_dir has
    no checkpoint yet and `fresh_start_ok` (--load == --save: a first run, or a requeued job
    before its first save). Any other --load without a checkpoint is an error: a mistyped
    path must not silently train from scratch."""
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None:
        if not fresh_start_ok:
            raise CheckpointError(f"--load {load_dir}: no checkpoint there ('{LATEST}' missing, and it is not "
                                  "--save, where a first run starts fresh); check the path")
        log(f"no checkpoint in {load_dir} ('{LATEST}' missing): starting from scratch")
        return None
    try:
        problem = None
        check_checkpoint_files(engine, load_dir, tag)
    except CheckpointError as exc:
        problem = str(exc)
    if dist.is_initialized():   # every rank stops together: one rank alone would hang the others
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(problem)
    try:
        path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as exc:
        raise CheckpointError(f"{os.path.join(load_dir, tag)}: DeepSpeed could not load this checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    if path is None:
        raise CheckpointError(f"{load_dir}/{tag}: DeepSpeed could not load this checkpoint")
    rng_path = os.path.join(load_dir, tag, "rng", f"rank_{_rank():05d}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False), tracker)
    else:
        log(f"warning: {rng_path} missing (different world size?): RNG streams restart from the seed")
    log(f"loaded checkpoint {os.path.join(load_dir, tag)} (iteration {client['iteration']}, "
        f"{client['consumed_train_samples']} samples consumed)")
    return client

"""Training checkpoints: DeepSpeed's engine state plus ours, committed by the ``latest`` marker.

Layout of ``--save DIR``: ``DIR/iter_0000100/`` holds DeepSpeed's files (model, optimizer and
scheduler state; client state = iteration, consumed samples, skipped-step counters, the
resolved config), ``rng/rank_XXXXX.pt`` (every RNG of each rank: python, numpy, torch, CUDA,
the TP tracker) and ``config.yaml``. ``DIR/latest`` names the newest complete one and is
written last, atomically, after every rank has finished writing: a save killed half-way
leaves ``latest`` on the previous checkpoint. ``manifest.json`` (written just before ``latest``)
lists every file of the checkpoint with its size, so files of two different saves in one
directory are refused by name at load. ``stage.json`` says which stage wrote it.


Which ``--save`` / ``--load`` combinations a run may use (a run never overwrites or rewinds
checkpoints it did not write) is decided in save_rules.py, before the run builds anything.

A save stops every rank together: each rank's write failure (DeepSpeed's files included) is
agreed on by all ranks before anything is committed, and then every rank raises one line.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import zipfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_open, temp_name
from ..checkpoint.layout import LATEST, ORIGIN, CheckpointError, list_tags, read_latest, tag_name, write_manifest
from ..config import save_yaml
from ..errors import OutputError
from ..parallel.random import RNGStatesTracker
from . import faults


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


_TORCH_WRITE_ERRORS = ("No space left", "basic_ios::clear", "file write failed", "unexpected pos",
                       "PytorchStreamWriter failed")


def _io_error(exc: BaseException) -> bool:
    """An error writing a file: OSError, or torch.save's RuntimeError (which carries no errno)."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_ERRORS))


def _free_bytes(directory: str) -> Optional[int]:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):
        return None


def _disk_full(exc: BaseException, directory: str) -> bool:
    """ENOSPC / EDQUOT, or a message saying so. torch.save's own failure ("unexpected pos ...
    basic_ios::clear") names no cause: a full disk only when the file system has (almost) no
    space left now; otherwise it is another I/O error (EIO, a stale NFS handle, ...)."""
    import errno
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(s in str(exc) for s in ("No space left", "Disk quota exceeded")):
        return True
    if isinstance(exc, RuntimeError) and _io_error(exc):
        free = _free_bytes(directory)
        return free is not None and free < 64 * 2**20
    return False


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


def _ranks_with(flag: bool) -> List[int]:
    """The ranks whose `flag` is set (one all-reduce of a flag per rank over the world group):
    every rank learns it, so none is left waiting in a collective another never reaches."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [_rank()] if flag else []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(dist.get_world_size(), device=device)
    if flag:
        flags[dist.get_rank()] = 1
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


@contextlib.contextmanager
def _deferred_write_errors(engine):
    """DeepSpeed writes its files between barriers of its own: a rank whose write fails must
    still reach them. Its checkpoint engine's save() records the first failure (and the file)
    instead of raising, and writes nothing more; the caller raises it after DeepSpeed returns."""
    failures: List[tuple] = []
    target = getattr(engine, "checkpoint_engine", None)
    if target is None or not hasattr(target, "save"):
        yield failures
        return
    had_own = "save" in vars(target)
    original = target.save

    def save(state_dict, path, *args, **kwargs):
        if failures:
            return
        try:
            original(state_dict, path, *args, **kwargs)
        except Exception as exc:   # noqa: BLE001 - raised by the caller once DeepSpeed is done
            failures.append((exc, path))
    target.save = save
    try:
        yield failures
    finally:
        if had_own:
            target.save = original
        else:
            del target.save


def _failure_message(exc: BaseException, path: Optional[str], save_dir: str, tag: str, full: bool) -> Optional[str]:
    """The one line for a failed write (None: not an I/O error, a bug: its traceback stays)."""
    tag_dir = os.path.join(save_dir, tag)
    marker = f"{os.path.join(save_dir, LATEST)} still names {read_latest(save_dir) or 'no checkpoint'}"
    path = path or getattr(exc, "filename", None)
    if full:
        where = f" (writing {path})" if path else ""
        return (f"no space left on the device while saving checkpoint {tag_dir}{where}: removed the incomplete "
                f"{tag}; {marker}: free space, then resume with --load {save_dir}")
    if _io_error(exc):
        return (f"could not write {path or tag_dir} (I/O error: {_detail(exc)}); {marker}; removed the incomplete "
                f"{tag}")
    return None


def _write_parts(engine, cfg, save_dir: str, tag: str, client: Dict[str, Any], tracker, origin) -> None:
    import json
    tag_dir = os.path.join(save_dir, tag)
    rank = _rank()
    with _deferred_write_errors(engine) as failures:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
    if failures:
        exc, path = failures[0]
        exc.ckpt_path = path
        raise exc
    rng_dir = os.path.join(tag_dir, "rng")
    os.makedirs(rng_dir, exist_ok=True)
    path = os.path.join(rng_dir, f"rank_{rank:05d}.pt")
    tmp = temp_name(path)
    try:
        torch.save(rng_state(tracker), tmp)
    except Exception as exc:
        exc.ckpt_path = path
        raise
    os.replace(tmp, path)
    if rank == 0:
        save_yaml(cfg, os.path.join(tag_dir, "config.yaml"))
        with atomic_open(os.path.join(tag_dir, ORIGIN)) as fh:
            json.dump(origin or {"load": None, "iteration": 0}, fh)


def save_checkpoint(engine, cfg, save_dir: str, iteration: int, client_state: Dict[str, Any],
                    tracker: Optional[RNGStatesTracker], keep_last: Optional[int] = None,
                    log: Callable[[str], None] = print,
                    before_commit: Optional[Callable[[str], None]] = None,
                    origin: Optional[Dict[str, Any]] = None) -> str:
    """Writes checkpoint `iteration` on every rank; `before_commit(tag_dir)` (every rank)
    adds files to it before ``latest`` names it; `origin` (save_rules.run_origin) goes into origin.json.
    A failed write on any rank stops every rank with one line, ``latest`` unchanged."""
    tag = tag_name(iteration)
    rank = _rank()
    tag_dir = os.path.join(save_dir, tag)
    client = dict(client_state, iteration=iteration, config=cfg.to_dict())
    # A directory of that name is a checkpoint a --ckpt-step rewind abandoned (save_rules.save_dir_problems):
    # replaced whole, so no file of it mixes with this save's. Rank 0 looks before any rank writes
    # (each looking for itself, a late rank would see the directory an early one just made).
    if _ranks_with(rank == 0 and os.path.isdir(tag_dir)):
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
            log(f"replacing {tag_dir} (abandoned by the --ckpt-step rewind)")
        _barrier()
    _agree_or_raise(lambda: _write_parts(engine, cfg, save_dir, tag, client, tracker, origin), save_dir, tag)
    if before_commit is not None:
        _agree_or_raise(lambda: before_commit(tag_dir), save_dir, tag)
    faults.maybe_kill_during_save(iteration)
    _barrier()   # every rank's files are complete before the marker moves
    if rank == 0:
        write_manifest(tag_dir)
        with atomic_open(os.path.join(save_dir, LATEST)) as fh:
            fh.write(tag)
        if keep_last:
            prune(save_dir, keep_last, log)
    _barrier()
    return tag


def _agree_or_raise(write: Callable[[], None], save_dir: str, tag: str) -> None:
    """Runs this rank's part of a save; then every rank learns whether any failed. On a
    failure rank 0 removes the uncommitted tag directory (after all agreed) and every rank
    raises: the failed one its own error, the others one naming it."""
    failure: Optional[BaseException] = None
    full = False
    try:
        write()
    except Exception as exc:   # noqa: BLE001 - every rank must hear of it first
        failure = exc
        full = _disk_full(exc, save_dir)   # before the partial files are removed
    failed = _ranks_with(failure is not None)
    if not failed:
        return
    if _rank() == 0:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)   # never committed
    _barrier()
    if failure is not None:
        msg = _failure_message(failure, getattr(failure, "ckpt_path", None), save_dir, tag, full)
        if msg is None:
            raise failure
        raise OutputError(msg) from failure
    raise OutputError(f"rank {failed[0]} failed to write its part of {tag} in {save_dir}: see its error; removed "
                      f"the incomplete {tag}; {os.path.join(save_dir, LATEST)} still names "
                      f"{read_latest(save_dir) or 'no checkpoint'}")


def prune(save_dir: str, keep_last: int, log: Callable[[str], None] = print) -> None:
    """Removes all but the newest keep_last checkpoints (never the one `latest` names)."""
    latest = read_latest(save_dir)
    for name in [tag_name(i) for i in list_tags(save_dir)][:-keep_last]:
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


def _unreadable(f: str) -> str:
    return (f"{f}: unreadable checkpoint file ({os.path.getsize(f)} bytes, not a torch.save archive: truncated or "
            "overwritten?); resume from an earlier checkpoint with --ckpt-step")


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
            raise CheckpointError(_unreadable(f))


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

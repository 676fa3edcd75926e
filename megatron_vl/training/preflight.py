"""Start-up guards every stage's job passes before it builds anything.

Stale JIT build locks (check_build_locks): a torch extension build killed half-way leaves a lock
file that no process holds, and every later run would wait on it forever without a word; on CPU
each rank looks for one before joining the process group and stops with one line instead.

preflight / guarded_save: hold --save's lock for the whole job (one writer per checkpoint
directory) and apply the --save rules (save_rules.py: a run never overwrites or rewinds
checkpoints it did not write) on rank 0, so that every rank hears a refusal and none is left
waiting in a collective; a requeued job (same command line) resumes its own checkpoints in --save.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, List, Optional

import torch.distributed as dist

from ..checkpoint.layout import LOCK, CheckpointError, read_latest, tag_name
from ..errors import UserError
from . import save_rules


def _holders(build_dir: str) -> Optional[bool]:
    """Whether a live process of this host works in build_dir (its cwd, an open file, a mapped
    library there: ninja and the compiler run with the build directory as cwd); None when
    /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    real = os.path.realpath(build_dir)

    def inside(path: str) -> bool:
        return path == real or path.startswith(real + os.sep)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if inside(os.readlink(f"/proc/{pid}/cwd")):
                return True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if inside(os.readlink(f"/proc/{pid}/fd/{fd}")):
                    return True
        except OSError:   # gone, or another user's: it cannot be building in our directory
            continue
    return False


def _last_change(directory: str) -> float:
    """The newest mtime in a build directory: a live build, here or on another host sharing
    the directory, keeps writing objects and ninja's log there."""
    newest = 0.0
    for dirpath, _, names in os.walk(directory):
        for name in names + ["."]:
            try:
                newest = max(newest, os.path.getmtime(os.path.join(dirpath, name)))
            except OSError:
                pass
    return newest


def stale_build_locks(grace_seconds: float = 120.0, log: Callable[[str], None] = print) -> List[str]:
    """Lock files of torch JIT extension builds (DeepSpeed's shm comm op on CPU) that no build
    holds: a build killed half-way leaves one (torch's FileBaton: no pid in it), and every later
    run waits on it forever without a word. Stale = no process of this host works in its build
    directory (a live build runs ninja there) and nothing there has changed for grace_seconds
    (a build on another node sharing the directory is invisible to the first test, not to the
    second). A lock not yet known stale is reported at once and watched; returns the stale ones."""
    import glob
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root
        root = get_default_build_root()
    found = []
    for path in sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))):
        warned = False
        while True:
            if not os.path.exists(path):
                break   # released: the build finished
            held = _holders(os.path.dirname(path))
            if held is not False:
                break   # a live build (or no way to tell): torch waits on it, as it should
            idle = time.time() - _last_change(os.path.dirname(path))
            if idle >= grace_seconds:
                found.append(path)
                break
            if not warned and grace_seconds >= 5:
                log(f"warning: {path}: a JIT extension build lock that no process of this host holds, unchanged "
                    f"for {idle:.0f} s; waiting up to {grace_seconds - idle:.0f} s more in case a job on another node "
                    f"is building it (if not: rm -rf {os.path.dirname(path)})")
                warned = True
            time.sleep(min(1.0, grace_seconds / 4))
    return found


class StaleBuildLock(UserError):
    """A JIT build lock no process holds (exit 1)."""


def check_build_locks(log: Callable[[str], None] = print) -> None:
    stale = stale_build_locks(log=log)
    if stale:
        lock = stale[0]
        raise StaleBuildLock(
            f"{lock}: left by a JIT extension build that was killed half-way (no process on this host is "
            f"building in {os.path.dirname(lock)} and nothing there has changed for minutes); this run would wait on it forever: remove that directory "
            f"(rm -rf {os.path.dirname(lock)}; it is rebuilt) and run again. If a job on another node shares "
            "TORCH_EXTENSIONS_DIR and is building it now, wait for that job instead")


@contextlib.contextmanager
def guarded_save(cfg, stage: str, rank: int):
    """What every stage's job runs inside: a requeued job keeps its command line, so once
    --save holds this run's own checkpoints it resumes from them (said in a line); then
    preflight's lock and --save rules for the whole job."""
    c = cfg.checkpoint
    note = save_rules.requeue_redirect(c.load, c.save, c.ckpt_step, bool(c.finetune))
    if note:
        if rank == 0:
            print(note, flush=True)
        c.load, c.finetune = c.save, False
    with preflight(cfg, stage, log=print if rank == 0 else (lambda m: None)):
        yield


@contextlib.contextmanager
def preflight(cfg, stage: str, log: Callable[[str], None] = print):
    """Before a run builds anything: holds --save's lock for the whole block (one writer per
    checkpoint directory) and refuses, on every rank, a --save that would overwrite or rewind
    checkpoints this run does not resume from, a --load of another stage's checkpoint, or one
    whose files come from two saves. Rank 0 decides (it alone takes the lock); every rank
    learns the outcome, so a refusal never leaves a rank waiting in a collective."""
    from ..atomic import exclusive_lock
    from ..errors import OutputError
    c = cfg.checkpoint
    rank = dist.get_rank() if dist.is_initialized() else 0
    with contextlib.ExitStack() as stack:
        problem = None
        if rank == 0:
            try:
                save_rules.check_load_stage(c.load, c.ckpt_step, stage)
                if c.save:
                    if os.path.exists(c.save) and not os.path.isdir(c.save):
                        raise OutputError(f"--save {c.save}: a file, not a directory")
                    try:
                        os.makedirs(c.save, exist_ok=True)
                    except OSError as exc:
                        raise OutputError(f"--save {c.save}: cannot create it: {exc.strerror}") from None
                    stack.enter_context(exclusive_lock(os.path.join(c.save, LOCK),
                                                       f"checkpoint directory {c.save}"))
                    save_rules.save_dir_problems(c.save, c.load, c.ckpt_step, bool(c.finetune), stage, log)
                tag = tag_name(c.ckpt_step) if c.ckpt_step is not None else (
                    read_latest(c.load) if c.load and os.path.isdir(c.load) else None)
                if tag not in (None, "release") and os.path.isdir(os.path.join(c.load, tag)):
                    mixed = save_rules.mixed_files_problem(c.load, tag)
                    if mixed:
                        raise CheckpointError(mixed)
            except Exception as exc:   # noqa: BLE001 - every rank must hear of it, then rank 0 re-raises
                problem = exc
        if dist.is_initialized() and dist.get_world_size() > 1:
            said = [str(problem) if problem is not None else None]
            dist.broadcast_object_list(said, src=0)
            if rank != 0 and said[0] is not None:
                raise CheckpointError(said[0])
        if problem is not None:
            raise problem
        yield

"""Write-then-rename: a reader never finds a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Callable, Iterable, List, Optional

from .errors import OutputError, UserError


def temp_name(path: str) -> str:
    """The name a file is written under before it is renamed to `path`: it carries the writer's
    pid and host, so a later run can tell a leftover of a dead writer from a live one's file."""
    return f"{path}.tmp{os.getpid()}-{socket.gethostname()}"


# `<final>.tmp<pid>-<host>`; `<final>.tmp<pid>` from older versions (host unknown: this one's).
_TEMP = re.compile(r"^(?P<final>.+?)\.tmp(?P<pid>\d+)(?:-(?P<host>[^/]+))?$")


def remove_stale_temps(directory: str, prefix: str = "", log: Optional[Callable[[str], None]] = print) -> List[str]:
    """Removes the temporary files in `directory` (names starting with `prefix`) whose writer was
    a process of this host that is no longer running: what a kill -9 or a full disk left behind.
    Says so for each, and returns their paths. Files of live writers or other hosts are kept."""
    removed = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return removed
    host = socket.gethostname()
    for name in sorted(names):
        m = _TEMP.match(name)
        if not m or not name.startswith(prefix):
            continue
        pid = int(m.group("pid"))
        if (m.group("host") or host) != host or pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                import shutil
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        removed.append(path)
        if log is not None:
            log(f"note: removed {path}, a temporary file left by pid {pid} (no longer running) before it "
                "was complete")
    return removed


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def guard_output(path: str, *, inputs: Iterable[str] = (), overwrite: bool = False, flag: str = "--output",
                 overwrite_flag: str = "--overwrite") -> None:
    """Refuses (OutputError) to write `path` when it is one of `inputs` (always: a tool never
    writes its output over its own input) or when it already exists and `overwrite` is False."""
    for src in inputs:
        if src and _same(path, src):
            raise OutputError(f"{flag} {path} is also an input of this run ({src}); choose another name")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{flag} {path} already exists and this run did not make it; choose another name, "
                          f"or pass {overwrite_flag} to replace it")


def guard_output_files(directory: str, names: Iterable[str], *, overwrite: bool = False, flag: str = "--output",
                       overwrite_flag: str = "--overwrite") -> None:
    """guard_output for the files a tool is about to write into `directory`: refuses when any
    of them exists (naming the first few) unless `overwrite`."""
    present = [n for n in names if os.path.lexists(os.path.join(directory, n))]
    if present and not overwrite:
        more = f" and {len(present) - 3} more" if len(present) > 3 else ""
        raise OutputError(f"{flag} {directory} already holds {', '.join(present[:3])}{more}, which this run "
                          f"would overwrite; choose another folder, or pass {overwrite_flag} to replace them")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """open() on a temporary name; renamed to `path` when the block ends without error,
    removed when it raises."""
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class LockHeld(UserError, OSError):
    """Another live process owns the lock."""


_held: set = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _earlier_attempt_of_this_job(owner: dict, me: dict) -> bool:
    """Whether the lock's owner was an earlier attempt (SLURM_RESTART_COUNT lower) of the same
    SLURM job as this process."""
    if not me.get("slurm_job") or owner.get("slurm_job") != me["slurm_job"]:
        return False
    theirs = owner.get("slurm_restart")
    return isinstance(theirs, int) and theirs < me["slurm_restart"]


@contextlib.contextmanager
def exclusive_lock(path: str, what: str):
    """Holds ``path`` (created with O_EXCL, holding the owner's host, pid, start time and
    command) for the block, so two runs writing the same outputs cannot both proceed: the
    second gets LockHeld naming the owner. A lock left by a dead process on this host is
    taken over, and so is one left by an earlier attempt of the same SLURM job (a requeue,
    perhaps on another node); any other from another host must be removed by hand. Re-entrant in one process."""
    import json
    import socket
    import sys
    import time
    key = os.path.abspath(path)
    if key in _held:
        yield
        return
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    if os.environ.get("SLURM_JOB_ID"):
        me["slurm_job"] = os.environ["SLURM_JOB_ID"]
        me["slurm_restart"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    os.makedirs(os.path.dirname(key) or ".", exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(key) as fh:
                    owner = json.load(fh)
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                    and not _pid_alive(owner["pid"]):
                os.remove(key)   # its owner died without cleaning up
                continue
            if _earlier_attempt_of_this_job(owner, me):
                # SLURM requeued this job (maybe onto another node): the attempt that held the
                # lock was ended by SLURM before this one started.
                print(f"note: taking over {key}, left by attempt {owner.get('slurm_restart', 0)} of SLURM job "
                      f"{me['slurm_job']} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')})", flush=True)
                os.remove(key)
                continue
            raise LockHeld(f"{key}: {what} is in use by another run (host {owner.get('host', '?')}, pid "
                           f"{owner.get('pid', '?')}, since {owner.get('started', '?')}: {owner.get('command', '?')}); "
                           "wait for it, or delete the lock file if that run is gone") from None
    else:
        raise LockHeld(f"{key}: could not take the lock for {what}")
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        try:
            os.remove(key)
        except FileNotFoundError:
            pass

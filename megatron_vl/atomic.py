"""Write-then-rename: a reader never finds a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os


def temp_name(path: str) -> str:
    """The name a file is written under before it is renamed to `path`."""
    return f"{path}.tmp{os.getpid()}"


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


class LockHeld(OSError):
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


@contextlib.contextmanager
def exclusive_lock(path: str, what: str):
    """Holds ``path`` (created with O_EXCL, holding the owner's host, pid, start time and
    command) for the block, so two runs writing the same outputs cannot both proceed: the
    second gets LockHeld naming the owner. A lock left by a dead process on this host is
    taken over; one from another host must be removed by hand. Re-entrant in one process."""
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

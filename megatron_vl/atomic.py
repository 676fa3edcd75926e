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


def same_path(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two paths name one file or folder (through symlinks and relative spellings);
    False when either is empty."""
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def guard_output(path: str, *, inputs: Iterable[str] = (), overwrite: bool = False, flag: str = "--output",
                 overwrite_flag: str = "--overwrite") -> None:
    """Refuses (OutputError) to write `path` when it is one of `inputs` (always: a tool never
    writes its output over its own input) or when it already exists and `overwrite` is False."""
    for src in inputs:
        if src and same_path(path, src):
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


# While a lock is held its file's mtime is refreshed every HEARTBEAT_SECONDS; a lock (of a
# version that beats: "heartbeat" in its JSON) silent for STALE_AFTER_SECONDS is the leftover
# of a run that died without cleaning up (kill -9, node failure, OOM), wherever it ran.
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 300
STALE_ENV = "MEGATRON_VL_LOCK_STALE_SECONDS"

_held: set = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _proc_start(pid) -> Optional[int]:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the pid, it
    names one process, where a pid alone may have been reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()   # after the command name, which may hold spaces
        return int(rest[19])                              # rest[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def _stale_after() -> float:
    raw = os.environ.get(STALE_ENV, "").strip()
    if not raw:
        return STALE_AFTER_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        from .errors import UsageError
        raise UsageError(f"{STALE_ENV}={raw!r}: not a number of seconds above 0")
    return value


def _fs_now(key: str) -> float:
    """The time as the lock's file system sees it (a probe file's mtime): mtimes on a shared file
    system come from its server, whose clock may differ from this host's."""
    probe = temp_name(key)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError:
        import time
        return time.time()


def _earlier_attempt_of_this_job(owner: dict, me: dict) -> bool:
    """Whether the lock's owner was an earlier attempt (SLURM_RESTART_COUNT lower) of the same
    SLURM job as this process."""
    if not me.get("slurm_job") or owner.get("slurm_job") != me["slurm_job"]:
        return False
    theirs = owner.get("slurm_restart")
    return isinstance(theirs, int) and theirs < me["slurm_restart"]


def _silence(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _why_take_over(key: str, owner: dict, me: dict, mtime: float) -> Optional[str]:
    """Why the lock's owner is known to be gone ("" when that needs no note), or None when it may
    be running."""
    pid = owner.get("pid")
    name = f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}: {owner.get('command', '?')}"
    if owner.get("host") == me["host"] and isinstance(pid, int):
        if owner.get("boot_id") and me.get("boot_id") and owner["boot_id"] != me["boot_id"]:
            return f"left by a run ({name}) from before this host last started"
        if pid == me["pid"]:
            # Not held by this process (re-entrance returned earlier), yet naming its pid: an earlier
            # incarnation in a pid namespace that was restarted (a container) and gave out the same pid.
            return f"left by an earlier process with this pid ({name}), restarted since"
        if not _pid_alive(pid):
            return ""   # its owner died without cleaning up
        theirs, now = owner.get("proc_start"), _proc_start(pid)
        if isinstance(theirs, int) and now is not None and now != theirs:
            return f"left by a run ({name}) that has ended: pid {pid} is now another process"
    if _earlier_attempt_of_this_job(owner, me):
        # SLURM requeued this job (maybe onto another node): the attempt that held the lock was
        # ended by SLURM before this one started.
        return (f"left by attempt {owner.get('slurm_restart', 0)} of SLURM job {me['slurm_job']} (host "
                f"{owner.get('host', '?')}, pid {owner.get('pid', '?')})")
    beat = owner.get("heartbeat")
    if not owner.get("host"):
        # Empty or unreadable: its writer died between creating and writing it, if that was long ago.
        silent = _fs_now(key) - mtime
        if silent > _stale_after():
            return f"an unreadable lock file last written {_silence(silent)} ago"
    elif isinstance(beat, (int, float)) and not isinstance(beat, bool):
        # Twice the owner's own period at least, so a short STALE setting never steals a live lock.
        silent = _fs_now(key) - mtime
        if silent > max(_stale_after(), 2 * beat):
            return f"left by a run ({name}) whose heartbeat has been silent for {_silence(silent)}"
    return None


def _beat(touch: Callable[[], None], stop, every: float) -> None:
    """Refreshes the lock's mtime until `stop` is set. Never raises: a lost beat only ages the lock."""
    try:
        while not stop.wait(every):
            try:
                touch()
            except Exception:   # noqa: BLE001 - a full or unreachable file system: try again later
                pass
    except BaseException:   # noqa: BLE001 - interpreter shutdown
        pass


@contextlib.contextmanager
def exclusive_lock(path: str, what: str):
    """Holds ``path`` (created with O_EXCL, holding the owner's host, pid, start time, command,
    boot id and process start time) for the block, so two runs writing the same outputs cannot
    both proceed: the second gets LockHeld naming the owner. Re-entrant in one process.

    While held, a daemon thread refreshes the file's mtime every HEARTBEAT_SECONDS. A lock is
    taken over (with a note) when its owner is known to be gone: on this host, a dead pid, a
    boot id other than this boot's, a pid now running another process (its start time differs),
    or this process's own pid (an earlier incarnation in a restarted pid namespace); from any
    host, an earlier attempt of the same SLURM job, or a lock whose heartbeat has been silent
    for STALE_AFTER_SECONDS (env MEGATRON_VL_LOCK_STALE_SECONDS): a chained job or a restarted
    pod after a kill -9 or a node failure. A lock of an older version (no heartbeat) from
    another host must be removed by hand."""
    import json
    import socket
    import sys
    import threading
    import time
    key = os.path.abspath(path)
    ident = os.path.realpath(key)   # one lock under two names is still one lock
    if ident in _held:
        yield
        return
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv), "heartbeat": HEARTBEAT_SECONDS}
    for name, value in (("boot_id", _boot_id()), ("proc_start", _proc_start("self"))):
        if value is not None:
            me[name] = value
    if os.environ.get("SLURM_JOB_ID"):
        me["slurm_job"] = os.environ["SLURM_JOB_ID"]
        me["slurm_restart"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    os.makedirs(os.path.dirname(key) or ".", exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner, seen = {}, None
            try:
                with open(key) as fh:
                    seen = os.fstat(fh.fileno())
                    owner = json.load(fh)
            except FileNotFoundError:
                continue   # its owner just released it
            except (OSError, ValueError):
                pass
            owner = owner if isinstance(owner, dict) else {}
            why = _why_take_over(key, owner, me, seen.st_mtime) if seen is not None else None
            if why is None:
                raise LockHeld(f"{key}: {what} is in use by another run (host {owner.get('host', '?')}, pid "
                               f"{owner.get('pid', '?')}, since {owner.get('started', '?')}: "
                               f"{owner.get('command', '?')}); wait for it, or delete the lock file if that "
                               "run is gone") from None
            if why:
                print(f"note: taking over {key}, {why}", flush=True)
            try:
                now = os.stat(key)
                if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):   # not a newer owner's file
                    os.remove(key)
            except FileNotFoundError:
                pass
    else:
        raise LockHeld(f"{key}: could not take the lock for {what}")
    try:
        os.write(fd, json.dumps(me).encode())
    except BaseException:
        os.close(fd)
        os.remove(key)
        raise
    mine = os.fstat(fd)
    # Through the descriptor where possible: never touches a newer owner's file of the same name.
    touch = (lambda: os.utime(fd)) if os.utime in os.supports_fd else (lambda: os.utime(key))
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(touch, stop, HEARTBEAT_SECONDS), daemon=True,
                            name=f"heartbeat of {key}")
    beat.start()
    _held.add(ident)
    try:
        yield
    finally:
        _held.discard(ident)
        stop.set()
        beat.join(timeout=5)   # a hung file system must not hang the exit; the thread is a daemon
        try:
            now = os.stat(key)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):   # another run may have taken it over
                os.remove(key)
        except FileNotFoundError:
            pass
        if not beat.is_alive():   # else it may still use fd: leave it open rather than touch a reused one
            os.close(fd)

"""User-facing errors and the one place that turns them into a line on stderr.

A problem the user can fix (a bad flag, a damaged file, an output that would overwrite
something) is raised as a ``UserError`` subclass whose message names the file, record or flag
and the reason. Entry points run through ``run_cli``, which prints ``error: <message>`` and
returns the class's exit code, with no traceback: ``MEGATRON_VL_DEBUG=1`` re-raises instead, for
a developer who wants the stack. Anything else (a bug) still ends in a traceback.

Exit codes (documented in the README): 2 for usage (flags, configuration), 1 for everything else
(data, checkpoints, locks, disk full, a path that is missing, unwritable or of the wrong kind).

This module is a leaf: it imports nothing of ours, so every layer may raise these.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """A problem the user can fix; its message is the whole report."""

    exit_code = 1


class UsageError(UserError):
    """Flags or configuration that cannot work together (exit 2)."""

    exit_code = 2


class InputError(UserError):
    """An input file or record that cannot be read as what it should be (exit 1)."""


class OutputError(UserError):
    """An output that would overwrite an input or a file this run did not make (exit 1)."""


_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EROFS,
                errno.ENAMETOOLONG, errno.ELOOP}


def debug_enabled() -> bool:
    """MEGATRON_VL_DEBUG=1 lets user errors through with their traceback."""
    return os.environ.get("MEGATRON_VL_DEBUG", "") not in ("", "0")


def disk_full_message(exc: OSError) -> str:
    where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
    return (f"no space left on the device{where}; files are written under temporary names and renamed "
            "when complete, so every existing output (and a checkpoint's `latest`) is still whole: free "
            "space and run again")


def report(exc: BaseException) -> Optional[int]:
    """The exit code for an exception a user should see as one line (printing that line), or
    None when it is not one."""
    if isinstance(exc, UserError):
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        print(f"error: {disk_full_message(exc)}", file=sys.stderr, flush=True)
        return 1
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS and getattr(exc, "filename", None):
        # A path the user named that is missing, unwritable, or of the wrong kind: the system's
        # own words with the path are the whole report.
        where = f"{exc.filename} -> {exc.filename2}" if getattr(exc, "filename2", None) else f"{exc.filename}"
        print(f"error: {where}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1
    if isinstance(exc, RuntimeError) and ("No space left on device" in str(exc)
                                          or "basic_ios::clear" in str(exc)):
        # torch.save's C++ writer reports a full disk as an iostream error, not an OSError.
        print(f"error: {disk_full_message(OSError(errno.ENOSPC, str(exc)))} ({str(exc).splitlines()[0]})",
              file=sys.stderr, flush=True)
        return 1
    return None


def run_cli(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Calls ``main(argv)`` and maps user errors to one line and their exit code."""
    try:
        rc = main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:   # noqa: BLE001 - sorted by report(); the rest re-raised
        if debug_enabled():
            raise
        code = report(exc)
        if code is None:
            raise
        return code
    return int(rc or 0)

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

"""Output directories that appear whole or not at all, and never replace what a tool did not
write: ``with atomic_directory(final, kind) as tmp`` (exports, conversions, release checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from typing import Optional, Tuple

from ..atomic import _pid_alive, remove_stale_temps, temp_name
from .layout import META_FILE, CheckpointError


def _old_name(final: str) -> str:
    """Where the previous output waits while the new one is renamed into place."""
    return temp_name(os.path.abspath(final) + ".old")


def _recover_leftovers(final: str, log=print) -> None:
    """What a writer killed while replacing `final` left in its parent: a previous output
    moved aside just before the swap is put back when `final` is gone (nothing else holds it);
    then every leftover of a dead writer (the half-written new output, an old one the swap had
    already replaced) is removed, saying so."""
    final = os.path.abspath(final)
    parent, base = os.path.dirname(final), os.path.basename(final)
    old_pattern = re.compile(re.escape(base) + r"\.old\.tmp(\d+)-(.+)$")
    for name in sorted(os.listdir(parent)):
        m = old_pattern.match(name)
        if not m or m.group(2) != socket.gethostname() or _pid_alive(int(m.group(1))):
            continue
        if not os.path.lexists(final):
            os.replace(os.path.join(parent, name), final)
            log(f"note: restored {final} from {name}, where a run (pid {m.group(1)}, no longer running) had moved "
                "it just before replacing it")
    for prefix in (base + ".tmp", base + ".old.tmp"):
        remove_stale_temps(parent, prefix=prefix, log=log)


def _atomic_dir(final: str, log=print):
    """A temporary sibling directory (temp_name: the writer's pid and host) that replaces
    `final` only when complete."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    _recover_leftovers(final, log)
    tmp = temp_name(os.path.abspath(final))
    os.makedirs(tmp)
    return tmp


def _commit_dir(tmp: str, final: str) -> None:
    if os.path.exists(final):
        if os.listdir(final):
            old = _old_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
            return
        os.rmdir(final)
    os.replace(tmp, final)


# What each kind of output directory holds, to recognise a previous output of the same kind:
# (marker file, JSON key, expected value).
OUTPUT_KINDS = {
    "release": (META_FILE, "format", "megatron-vl-release"),
    "hf-llama": ("config.json", "model_type", "llama"),
    "vlgpt-export": ("vlgpt_config.json", "format", "megatron-vl-vlgpt"),
    "stage1-export": ("stage1_export.json", "format", "megatron-vl-stage1"),
}


def output_kind(path: str) -> Optional[str]:
    """Which of OUTPUT_KINDS a directory is a previous output of, or None. A VL-GPT export
    also holds an HF LLaMA config.json, so it is checked first."""
    for kind in ("vlgpt-export", "release", "hf-llama", "stage1-export"):
        marker, key, value = OUTPUT_KINDS[kind]
        try:
            with open(os.path.join(path, marker)) as fh:
                if json.load(fh).get(key) == value:
                    return kind
        except (OSError, ValueError, AttributeError):
            continue
    return None


def check_output_dir(final: str, kind: str, sources: Tuple[str, ...] = ()) -> None:
    """Refuses an output directory whose replacement would destroy anything but a previous
    output of the same kind: a non-empty directory of another kind (a project folder, a
    checkpoint), a file, or a directory holding one of the inputs."""
    target = os.path.realpath(final)
    for src in filter(None, sources):
        src_real = os.path.realpath(src)
        if src_real == target or src_real.startswith(target + os.sep):
            raise CheckpointError(f"--save {final}: it holds the input {src}; replacing it would delete the "
                                  "input. Choose a new directory")
    if not os.path.lexists(final):
        return
    if not os.path.isdir(final):
        raise CheckpointError(f"--save {final}: exists and is not a directory")
    if not os.listdir(final):
        return
    found = output_kind(final)
    if found != kind:
        what = f"a {found} directory" if found else "a non-empty directory that is not a previous output"
        raise CheckpointError(f"--save {final}: {what}; only a previous {kind} output is replaced. Nothing was "
                              "written or deleted: choose a new or empty directory, or remove it yourself")


class atomic_directory:
    """``with atomic_directory(final, kind) as tmp:`` write into tmp; it replaces final only
    when the block completes, and is removed if it raises. A non-empty `final` is replaced
    only when it is a previous output of the same `kind` (check_output_dir); the check runs
    again just before the swap, so a directory that appeared meanwhile is not lost either."""

    def __init__(self, final: str, kind: str, sources: Tuple[str, ...] = ()):
        self.final, self.kind, self.sources = final, kind, tuple(s for s in sources if s)
        check_output_dir(self.final, self.kind, self.sources)

    def __enter__(self) -> str:
        self.tmp = _atomic_dir(self.final)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                check_output_dir(self.final, self.kind, self.sources)
                _commit_dir(self.tmp, self.final)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

"""What every reader of raw corpora shares: the records it hands on (``RawDocument`` with its
``ImageRef``s, ``LineRecord`` for a jsonl line parsed later in a worker), the ``Report``
that counts each skipped record under a reason with the first place it happened (file:line,
file:row N, tar:key), ``guarded`` for the failures no check foresaw, and the errors.
Nothing is dropped silently."""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

from ..errors import InputError, UsageError, debug_enabled

T = TypeVar("T")


class DataInputError(InputError, ValueError):
    """An input file that cannot be read as its format (exit 1; a ValueError for older callers)."""


class StrictSkip(DataInputError):
    """A record that would be skipped, under --strict."""


class DataUsageError(UsageError, ValueError):
    """Flags that do not fit the data (exit 2)."""


class InputFileMissing(InputError, FileNotFoundError):
    pass


@dataclass
class ImageRef:
    name: str                      # where it came from, for reports
    path: Optional[str] = None
    data: Optional[bytes] = None


@dataclass
class RawDocument:
    source: str                    # file:line / file:row / tar:key
    sentences: List[str]
    images: List[Tuple[int, ImageRef]] = field(default_factory=list)  # (sentence index, image)


@dataclass
class LineRecord:
    """One raw jsonl line, parsed where it is encoded (in a worker), not in the reader."""
    where: str
    raw: str


@dataclass
class Report:
    documents_read: int = 0
    documents_written: int = 0
    images_placed: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_seen: Dict[str, str] = field(default_factory=dict)
    cuts: Counter = field(default_factory=Counter)
    """What --doc-sampling paper left out of documents, by reason (doc_sampling.py): the rule
    at work, never an error, not even under --strict."""

    def skip(self, reason: str, where: str, strict: bool = False) -> None:
        if strict:
            raise StrictSkip(f"{where}: {reason} (--strict turns skips into errors)")
        self.skipped[reason] += 1
        self.first_seen.setdefault(reason, where)

    def cut(self, reason: str, where: str, count: int = 1) -> None:
        if count > 0:
            self.cuts[reason] += count
            self.first_seen.setdefault(reason, where)

    def merge(self, other: "Report") -> None:
        self.documents_read += other.documents_read
        self.documents_written += other.documents_written
        self.images_placed += other.images_placed
        self.skipped.update(other.skipped)
        self.cuts.update(other.cuts)
        for k, v in other.first_seen.items():
            self.first_seen.setdefault(k, v)

    def to_dict(self) -> Dict:
        out = {"documents_read": self.documents_read, "documents_written": self.documents_written,
               "images_placed": self.images_placed, "skipped": dict(self.skipped),
               "first_seen": self.first_seen}
        if self.cuts:   # pack mode's metadata stays as it was
            out["cuts"] = dict(self.cuts)
        return out

    @classmethod
    def from_dict(cls, d: Dict) -> "Report":
        """The report a meta.json recorded (to_dict's output)."""
        return cls(d["documents_read"], d["documents_written"], d["images_placed"], Counter(d["skipped"]),
                   dict(d["first_seen"]), Counter(d.get("cuts", {})))

    def format(self) -> str:
        lines = [f"documents read: {self.documents_read}", f"documents written: {self.documents_written}",
                 f"images placed: {self.images_placed}"]
        for reason in sorted(self.skipped):
            lines.append(f"skipped ({reason}): {self.skipped[reason]}  first at {self.first_seen[reason]}")
        for reason in sorted(self.cuts):
            lines.append(f"cut ({reason}): {self.cuts[reason]}  first at {self.first_seen[reason]}")
        return "\n".join(lines)


def guarded(report: Report, where: str, strict: bool, build: Callable[[], T]) -> Optional[T]:
    """build() for one record; a record that breaks it in a way no check foresaw (a field of an
    unexpected type deep inside) is counted as `malformed record (<exception>)` with its place
    instead of ending the run. --strict makes it an error (the original exception chained);
    MEGATRON_VL_DEBUG=1 lets the exception itself through, for a developer looking for a bug."""
    try:
        return build()
    except (InputError, MemoryError):
        raise
    except Exception as exc:   # noqa: BLE001 - counted, or re-raised below
        if debug_enabled():
            raise
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        try:
            report.skip(f"malformed record ({type(exc).__name__}: {first})" if first else
                        f"malformed record ({type(exc).__name__})", where, strict)
        except StrictSkip as err:
            raise err from exc
        return None


def expand_inputs(patterns: List[str]) -> List[str]:
    files: List[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not matched:
            raise InputFileMissing(f"--input {pattern}: no such file")
        files.extend(matched)
    return files

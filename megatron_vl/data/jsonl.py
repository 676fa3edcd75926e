"""The lines of jsonl files, plain or zipped, as (place, text) pairs: a line that is not
UTF-8, a zip whose directory is lost and a stream cut short are counted in the ``Report``
with their place, and the lines before the damage are still read."""

from __future__ import annotations

import json
import struct
import tarfile
import zipfile
import zlib
from typing import Iterator, Optional, Tuple

from .records import Report, StrictSkip

try:   # optional: twice json's speed on records; what it refuses, json reads (below)
    from orjson import loads as _fast_loads
except ImportError:   # pragma: no cover - the stdlib alone gives the same results
    _fast_loads = json.loads


def _holds_huge_float(obj) -> bool:
    """Whether a parsed object holds a float of 2**63 or more in size: orjson reads an integer
    beyond 64 bits as one where json keeps the int (orjson 3.8, measured). A walk of the
    object (~1 us for an MMC4 record); a regex over the line for long digit runs cost 23 us."""
    stack = [obj]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is float:
            if not -9.2e18 < value < 9.2e18:
                return True
        elif kind is dict:
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
    return False


# What reading a damaged compressed or archived stream raises: zlib.error and the archive
# modules' own errors are not OSErrors, so each is listed.
STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile,
                 tarfile.TarError, NotImplementedError)


def _decoded_lines(where_prefix: str, lines: Iterator[bytes], report: Report, strict: bool,
                   start: int = 1) -> Iterator[Tuple[str, str]]:
    for i, raw in enumerate(lines, start):
        try:
            yield f"{where_prefix}:{i}", raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.skip("invalid UTF-8", f"{where_prefix}:{i} (byte {exc.start})", strict)


def _salvage_zip(path: str, report: Report, strict: bool, why: str) -> Iterator[Tuple[str, str]]:
    """The lines of a zip whose directory (at its end) is lost, e.g. a download cut short:
    the first member is streamed from its local header until the data runs out."""
    report.skip("damaged file, read up to the damage", f"{path} ({why})", strict)
    with open(path, "rb") as fh:
        head = fh.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return
        method, _, _, _, size, _, name_len, extra_len = struct.unpack("<HHHIIIHH", head[8:30])
        member = fh.read(name_len).decode("utf-8", "replace")
        fh.read(extra_len)
        if method not in (0, 8):
            return
        inflate = zlib.decompressobj(-15) if method == 8 else None
        pending, line_no, left = b"", 1, size if method == 0 else None
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            try:
                data = inflate.decompress(chunk) if inflate else chunk[:left]
            except zlib.error:
                break
            if left is not None:
                left -= len(data)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield from _decoded_lines(f"{path}!{member}", iter(lines), report, strict, line_no)
            line_no += len(lines)
            if (inflate is not None and inflate.eof) or left == 0:
                if pending:
                    yield from _decoded_lines(f"{path}!{member}", iter([pending]), report, strict, line_no)
                return
        # The stream ended early: the unterminated last line is incomplete, so it is not read.


def jsonl_lines(path: str, report: Report, strict: bool) -> Iterator[Tuple[str, str]]:
    """(where, line) pairs from a .jsonl or a .jsonl.zip (every member of the zip). A line
    that is not UTF-8 is a counted skip; a file cut short yields what precedes the damage and
    the damage is counted with the file's name."""
    if not path.endswith(".zip"):
        with open(path, "rb") as fh:
            yield from _decoded_lines(path, fh, report, strict)
        return
    try:
        zf = zipfile.ZipFile(path)
    except STREAM_ERRORS as exc:
        yield from _salvage_zip(path, report, strict, f"{type(exc).__name__}: {exc}")
        return
    with zf:
        for member in zf.namelist():
            try:
                with zf.open(member) as fh:
                    yield from _decoded_lines(f"{path}!{member}", fh, report, strict)
            except StrictSkip:
                raise
            except STREAM_ERRORS as exc:   # a bad deflate stream raises zlib.error, not an OSError
                report.skip("damaged file, read up to the damage",
                            f"{path}!{member} ({type(exc).__name__}: {exc})", strict)


def parse_json_object(where: str, raw: str, report: Report, strict: bool) -> Optional[dict]:
    if not raw.strip():
        return None
    try:
        obj = _fast_loads(raw)
        if _fast_loads is not json.loads and _holds_huge_float(obj):
            raise ValueError("a number orjson may have read otherwise than json")
    except ValueError:
        # orjson refuses some lines json reads (NaN, 1e400, lone surrogates) and reads integers
        # past 64 bits as floats: json decides, so the object and the message are json's.
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.skip("malformed JSON line", f"{where} ({exc.msg})", strict)
            return None
    if not isinstance(obj, dict):
        report.skip("malformed JSON line", f"{where} (not an object)", strict)
        return None
    return obj

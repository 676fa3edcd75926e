"""Readers of the raw corpora, turning each record into a ``RawDocument``: the text as a list
of sentences and each image attached to the sentence it belongs to. ``read_records`` yields
raw lines for the jsonl formats (``record_document`` parses them, in the preprocessing
workers) and whole documents for the formats read through a library. Anything malformed is
counted in the ``Report`` under a reason, with the first place it happened (file:line,
file:row N, tar:key); nothing is dropped silently.

Formats:
- ``mmc4``: MMC4 jsonl, or its distributed ``*.jsonl.zip`` shards. Images are files under
  the image root named by ``image_name``; each is attached to ``matched_text_index``;
  ``min_sim`` drops images whose ``matched_sim`` is below it.
- ``obelics``: OBELICS parquet (``texts`` / ``images`` aligned lists, one of the two None at
  each position). An image is either bytes in the row (a bytes list or a struct with a
  ``bytes`` field, as HF datasets stores images) or a URL whose file lies under the image
  root named ``sha1(url).hexdigest()`` (any extension). It is attached to the next text
  in the row (the previous one when it is last).
- ``wds-pairs``: img2dataset webdataset tars (``NNNNN.jpg`` + ``.txt`` + ``.json``).
- ``jsonl-text``: Megatron-style jsonl, text only, under ``json_key``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import tarfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from ..errors import InputError, UsageError, debug_enabled

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What reading a damaged compressed or archived stream raises: zlib.error and the archive
# modules' own errors are not OSErrors, so each is listed.
STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile,
                 tarfile.TarError, NotImplementedError)
T = TypeVar("T")


class DataInputError(InputError, ValueError):
    """An input file that cannot be read as its format (exit 1; a ValueError for older callers)."""


class StrictSkip(DataInputError):
    """A record that would be skipped, under --strict."""


class DataUsageError(UsageError, ValueError):
    """Flags that do not fit the data (exit 2)."""


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
class Report:
    documents_read: int = 0
    documents_written: int = 0
    images_placed: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_seen: Dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str, strict: bool = False) -> None:
        if strict:
            raise StrictSkip(f"{where}: {reason} (--strict turns skips into errors)")
        self.skipped[reason] += 1
        self.first_seen.setdefault(reason, where)

    def merge(self, other: "Report") -> None:
        self.documents_read += other.documents_read
        self.documents_written += other.documents_written
        self.images_placed += other.images_placed
        self.skipped.update(other.skipped)
        for k, v in other.first_seen.items():
            self.first_seen.setdefault(k, v)

    def to_dict(self) -> Dict:
        return {"documents_read": self.documents_read, "documents_written": self.documents_written,
                "images_placed": self.images_placed, "skipped": dict(self.skipped),
                "first_seen": self.first_seen}

    def format(self) -> str:
        lines = [f"documents read: {self.documents_read}", f"documents written: {self.documents_written}",
                 f"images placed: {self.images_placed}"]
        for reason in sorted(self.skipped):
            lines.append(f"skipped ({reason}): {self.skipped[reason]}  first at {self.first_seen[reason]}")
        return "\n".join(lines)


class InputFileMissing(InputError, FileNotFoundError):
    pass


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
    import struct
    import zlib
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


def _jsonl_lines(path: str, report: Report, strict: bool) -> Iterator[Tuple[str, str]]:
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


def _parse_json(where: str, raw: str, report: Report, strict: bool) -> Optional[dict]:
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        report.skip("malformed JSON line", f"{where} ({exc.msg})", strict)
        return None
    if not isinstance(obj, dict):
        report.skip("malformed JSON line", f"{where} (not an object)", strict)
        return None
    return obj


@dataclass
class LineRecord:
    """One raw jsonl line, parsed where it is encoded (in a worker), not in the reader."""
    where: str
    raw: str


def mmc4_document(rec: LineRecord, image_root: str, min_sim: float, report: Report,
                  strict: bool) -> Optional[RawDocument]:
    doc = _parse_json(rec.where, rec.raw, report, strict)
    if doc is None:
        return None
    where, texts = rec.where, doc.get("text_list")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        report.skip("record without a text_list of strings", where, strict)
        return None
    infos = doc.get("image_info") or []
    if not isinstance(infos, list) or not all(isinstance(i, dict) and isinstance(i.get("image_name"), str)
                                              for i in infos):
        report.skip("record with a malformed image_info (expected a list of objects with an image_name)",
                    where, strict)
        return None
    images = []
    for info in infos:
        idx = info.get("matched_text_index")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(texts):
            report.skip("matched_text_index out of range", f"{where} (index {idx!r}, {len(texts)} sentences)",
                        strict)
            continue
        sim = info.get("matched_sim")
        if sim is not None and (not isinstance(sim, (int, float)) or isinstance(sim, bool)):
            report.skip("record with a malformed image_info (expected a list of objects with an image_name)",
                        f"{where} (matched_sim {sim!r})", strict)
            return None
        if sim is not None and math.isnan(sim):
            # NaN compares false with everything: it would pass any --min-sim unseen.
            if min_sim > 0:
                report.skip("image whose matched_sim is NaN (cannot pass --min-sim)",
                            f"{where} ({info['image_name']})", strict)
                continue
        elif sim is not None and sim < min_sim:
            report.skip("image below --min-sim", where)
            continue
        name = info.get("image_name")
        images.append((idx, ImageRef(name=f"{where} {name}", path=os.path.join(image_root, str(name)))))
    return RawDocument(where, texts, images)


def _obelics_image(item, url_root: Optional[str]) -> Optional[ImageRef]:
    if isinstance(item, (bytes, bytearray)):
        return ImageRef(name="<bytes>", data=bytes(item))
    if isinstance(item, dict) and isinstance(item.get("bytes"), (bytes, bytearray)):
        return ImageRef(name=str(item.get("path") or "<bytes>"), data=bytes(item["bytes"]))
    if isinstance(item, str):
        key = hashlib.sha1(item.encode("utf-8")).hexdigest()
        candidates = [os.path.join(url_root or "", key)] + \
            [os.path.join(url_root or "", f"{key}.{e}") for e in IMAGE_EXTENSIONS]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        return ImageRef(name=item, path=path)
    return None


def read_obelics(path: str, image_root: Optional[str], report: Report, strict: bool) -> Iterator[RawDocument]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataInputError(f"{path}: unreadable parquet file: {exc}") from None
    missing = {"texts", "images"} - set(table.schema_arrow.names)
    if missing:
        raise DataInputError(f"{path}: parquet lacks column(s) {sorted(missing)}")
    row = 0
    try:
        for batch in table.iter_batches(columns=["texts", "images"], batch_size=256):
            for texts, images in zip(batch.column("texts").to_pylist(), batch.column("images").to_pylist()):
                where = f"{path}:row {row}"
                row += 1
                doc = guarded(report, where, strict, lambda: _obelics_document(where, texts, images, image_root,
                                                                                report, strict))
                if doc is not None:
                    yield doc
    except StrictSkip:
        raise
    except STREAM_ERRORS as exc:   # a damaged page or column chunk further in
        raise DataInputError(f"{path}: unreadable parquet file at row {row}: {type(exc).__name__}: {exc}") from None


def _obelics_document(where: str, texts, images, image_root: Optional[str], report: Report,
                      strict: bool) -> Optional[RawDocument]:
    if not isinstance(texts, list) or not isinstance(images, list):
        # A string would be read one character per sentence.
        report.skip("texts/images not lists", f"{where} (texts {type(texts).__name__}, images "
                    f"{type(images).__name__})", strict)
        return None
    if len(texts) != len(images):
        report.skip("texts/images lists differ in length", where, strict)
        return None
    if not all(t is None or isinstance(t, str) for t in texts):
        report.skip("texts entry that is not a string", where, strict)
        return None
    sentences, pending, attached = [], [], []
    for slot, (text, image) in enumerate(zip(texts, images)):
        if text is not None and image is not None:
            # OBELICS holds exactly one of the two per slot: the text is kept, the image counted.
            report.skip("slot with both a text and an image (image dropped)", f"{where} slot {slot}", strict)
            image = None
        if text is not None:
            sentences.append(text)
            attached.extend((len(sentences) - 1, ref) for ref in pending)
            pending = []
        elif image is not None:
            ref = _obelics_image(image, image_root)
            if ref is None:
                report.skip("image entry of unknown type", f"{where} slot {slot}", strict)
            else:
                pending.append(ref)
    if pending and sentences:   # trailing images go after the last sentence
        attached.extend((len(sentences) - 1, ref) for ref in pending)
    elif pending:
        report.skip("image without any text in its document", where, strict)
    return RawDocument(where, sentences, attached)


def read_wds_pairs(path: str, report: Report, strict: bool) -> Iterator[RawDocument]:
    """img2dataset pairs. A cut-short or empty tar yields the samples before the damage; the
    damage is counted with the file's name."""
    import webdataset as wds

    def damaged(exc: Exception) -> bool:
        report.skip("damaged file, read up to the damage", f"{path} ({type(exc).__name__}: {exc.args[0] if exc.args else exc})",
                    strict)
        return True

    # One shard, already chosen for this rank/worker by the caller: webdataset must not split it again.
    dataset = wds.WebDataset(path, shardshuffle=False, empty_check=False, handler=damaged, nodesplitter=None,
                             workersplitter=None)
    for sample in dataset:
        where = f"{path}:{sample.get('__key__')}"
        caption = sample.get("txt")
        image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if caption is None or image_key is None:
            report.skip("pair without caption or image", where, strict)
            continue
        try:
            text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError as exc:
            report.skip("invalid UTF-8", f"{where}.txt (byte {exc.start})", strict)
            continue
        yield RawDocument(where, [text.strip()], [(0, ImageRef(name=where, data=sample[image_key]))])


def jsonl_text_document(rec: LineRecord, key: str, report: Report, strict: bool) -> Optional[RawDocument]:
    doc = _parse_json(rec.where, rec.raw, report, strict)
    if doc is None:
        return None
    if not isinstance(doc.get(key), str):
        report.skip(f"record without a string '{key}'", rec.where, strict)
        return None
    return RawDocument(rec.where, [doc[key]])


def read_records(fmt: str, path: str, report: Report, *, image_root: Optional[str] = None,
                 json_key: str = "text", strict: bool = False) -> Iterator:
    """What the reader hands to the encoders: raw lines for the jsonl formats (so parsing
    runs in the workers), whole documents for the formats read through a library."""
    if fmt in ("mmc4", "jsonl-text"):
        return (LineRecord(where, raw) for where, raw in _jsonl_lines(path, report, strict))
    if fmt == "obelics":
        return read_obelics(path, image_root, report, strict)
    if fmt == "wds-pairs":
        return read_wds_pairs(path, report, strict)
    raise DataUsageError(f"unknown --input-format {fmt!r}")


def record_document(fmt: str, record, report: Report, *, image_root: Optional[str] = None, min_sim: float = 0.0,
                    json_key: str = "text", strict: bool = False) -> Optional[RawDocument]:
    if not isinstance(record, LineRecord):
        return record
    if fmt == "mmc4":
        return mmc4_document(record, image_root or "", min_sim, report, strict)
    return jsonl_text_document(record, json_key, report, strict)

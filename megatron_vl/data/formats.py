"""Readers of the raw pretraining corpora, turning each record into a ``RawDocument``: the text
as a list of sentences and each image attached to the sentence it belongs to. Anything
malformed is counted in the ``Report`` under a reason, with the first place it happened
(file:line, file:row N, tar:key); nothing is dropped silently. format_registry.py names each
format and says which reader reads it.

- ``mmc4``: MMC4 jsonl, or its distributed ``*.jsonl.zip`` shards. Images are files under
  the image root named by ``image_name``; each is attached to ``matched_text_index``;
  ``min_sim`` drops images whose ``matched_sim`` is below it. The lines are parsed in the
  tokenizing workers (``mmc4_document``).
- ``obelics``: OBELICS parquet (``texts`` / ``images`` aligned lists, one of the two None at
  each position). An image is either bytes in the row (a bytes list or a struct with a
  ``bytes`` field, as HF datasets stores images) or a URL whose file lies under the image
  root named ``sha1(url).hexdigest()`` (any extension). It is attached to the next text
  in the row (the previous one when it is last).
- ``wds-pairs``: img2dataset webdataset tars (``NNNNN.jpg`` + ``.txt`` + ``.json``).
- ``jsonl-text``: Megatron-style jsonl, text only, under ``json_key`` (``jsonl_text_document``,
  in the workers).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterator, Optional

from .jsonl import STREAM_ERRORS, parse_json_object
# Report, guarded, expand_inputs and the errors are imported from here by stage1/, tools/ and
# tests: records.py is their home.
from .records import (DataInputError, DataUsageError, ImageRef, InputFileMissing, LineRecord,  # noqa: F401
                      RawDocument, Report, StrictSkip, expand_inputs, guarded)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def mmc4_document(rec: LineRecord, image_root: str, min_sim: float, report: Report,
                  strict: bool) -> Optional[RawDocument]:
    doc = parse_json_object(rec.where, rec.raw, report, strict)
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
    doc = parse_json_object(rec.where, rec.raw, report, strict)
    if doc is None:
        return None
    if not isinstance(doc.get(key), str):
        report.skip(f"record without a string '{key}'", rec.where, strict)
        return None
    return RawDocument(rec.where, [doc[key]])

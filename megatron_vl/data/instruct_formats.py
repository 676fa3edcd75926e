"""Readers of instruction-tuning data (stage 3), each record becoming a ``Conversation``.

- ``llava``: the LLaVA json list (also SVIT's LLaVA-format release): ``id``, optional
  ``image`` (a path under ``--image-root``) and ``conversations`` of ``{"from": "human" |
  "gpt", "value"}``. ``<image>`` (with the newline beside it) is taken out of the text and the
  image goes where the template puts a user's images, in the turn that held ``<image>``.
- ``coco-captions``: the Karpathy split file ``dataset_coco.json`` (``images[]`` with
  ``filepath``, ``filename``, ``split``, ``sentences[].raw``): one caption conversation per
  image of the chosen splits, its question phrasing and its caption chosen by a seeded hash
  of the image's name.
- ``instructpix2pix``: parquet ``original_image``, ``edit_prompt``, ``edited_image``: "input
  image + instruction -> output image"; the output image is the assistant's (a regression
  target).
- ``magicbrush``: parquet ``img_id``, ``turn_index``, ``source_img``, ``instruction``,
  ``target_img``; the turns of an ``img_id`` in ``turn_index`` order make one multi-turn
  conversation (the source image in the first turn; each turn's target image is the answer).

Broken records are counted skips naming the record, never fatal unless --strict: no
assistant reply, an ``<image>`` count unlike the record's images, an empty answer, a turn of
an unknown role, a missing field. Missing or undecodable images are counted when the record
is encoded (preprocess.encode_conversation).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence

from .conversation import ASSISTANT, USER, Conversation, Turn
from .formats import ImageRef, Report

INSTRUCT_FORMATS = ("llava", "coco-captions", "instructpix2pix", "magicbrush")
IMAGE_TAG = "<image>"      # where an image sits in a text (LLaVA data, generation prompts)
_TAG_WITH_NEWLINE = re.compile(r"\n?<image>\n?")
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What does this picture show? Answer in one sentence.",
    "Give a brief description of the image.",
    "Summarize the visual content of the image.",
    "Provide a one-sentence caption for the photo.",
)


def seeded_choice(seed: int, key: str, n: int, salt: str = "") -> int:
    digest = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _valid(conv: Conversation, report: Report, strict: bool) -> Optional[Conversation]:
    """The checks every format shares: an assistant reply, no empty answer."""
    answers = [t for t in conv.turns if t.role == ASSISTANT]
    if not answers:
        report.skip("conversation without an assistant reply", conv.source, strict)
        return None
    if any(not t.text.strip() and not t.images for t in answers):
        report.skip("empty answer", conv.source, strict)
        return None
    return conv


def read_llava(path: str, image_root: Optional[str], report: Report, strict: bool) -> Iterator[Conversation]:
    try:
        with open(path, "rb") as fh:
            records = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable LLaVA json list: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: a LLaVA file is a json list of records, found {type(records).__name__}")
    roles = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
    for i, rec in enumerate(records):
        where = f"{path}:record {i} (id {rec.get('id') if isinstance(rec, dict) else None})"
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            report.skip("record without a conversations list", where, strict)
            continue
        turns: List[Turn] = []
        tags, bad = 0, None
        for t in rec["conversations"]:
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                bad = "turn without a string value"
                break
            role = roles.get(t.get("from"))
            if role is None:
                bad = f"turn of unknown role {t.get('from')!r}"
                break
            text = t["value"]
            n = text.count(IMAGE_TAG)
            tags += n
            turns.append(Turn(role, _TAG_WITH_NEWLINE.sub("", text).strip() if n else text.strip()))
            if n and role == USER:
                turns[-1].images = ["pending"] * n
        if bad:
            report.skip(bad, where, strict)
            continue
        image = rec.get("image")
        names = [image] if isinstance(image, str) else list(image) if isinstance(image, list) else []
        if tags != len(names):
            report.skip(f"{IMAGE_TAG} count differs from the record's images", f"{where}: {tags} tag(s), "
                        f"{len(names)} image(s)", strict)
            continue
        refs = iter(ImageRef(name=f"{where} {n}", path=os.path.join(image_root or "", n)) for n in names)
        for turn in turns:
            turn.images = [next(refs) for _ in turn.images]
        conv = _valid(Conversation(where, turns), report, strict)
        if conv is not None:
            yield conv


def read_coco_captions(path: str, image_root: Optional[str], report: Report, strict: bool,
                       splits: Sequence[str] = ("train", "restval"), seed: int = 0) -> Iterator[Conversation]:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable Karpathy split json: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: no 'images' list (the Karpathy dataset_coco.json layout)")
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            report.skip("image entry without a filename", f"{path}:images[{i}]", strict)
            continue
        name = os.path.join(im.get("filepath") or "", im["filename"])
        where = f"{path}:images[{i}] ({name})"
        if im.get("split") not in splits:
            continue
        captions = [s.get("raw").strip() for s in im.get("sentences") or []
                    if isinstance(s, dict) and isinstance(s.get("raw"), str) and s.get("raw").strip()]
        if not captions:
            report.skip("image without captions", where, strict)
            continue
        prompt = CAPTION_PROMPTS[seeded_choice(seed, name, len(CAPTION_PROMPTS), "prompt")]
        caption = captions[seeded_choice(seed, name, len(captions), "caption")]
        yield Conversation(where, [Turn(USER, prompt, [ImageRef(name=where, path=os.path.join(image_root or "", name))]),
                                   Turn(ASSISTANT, caption)])


def _parquet_rows(path: str, columns: Sequence[str]) -> Iterator[Dict]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise ValueError(f"{path}: unreadable parquet file: {exc}") from None
    missing = set(columns) - set(table.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: parquet lacks column(s) {sorted(missing)}")
    for batch in table.iter_batches(columns=list(columns), batch_size=64):
        yield from batch.to_pylist()


def _image_cell(cell, where: str) -> Optional[ImageRef]:
    """An image column's value as HF datasets / pandas write it: bytes, or {bytes, path}."""
    if isinstance(cell, (bytes, bytearray)):
        return ImageRef(name=where, data=bytes(cell))
    if isinstance(cell, dict) and isinstance(cell.get("bytes"), (bytes, bytearray)):
        return ImageRef(name=where, data=bytes(cell["bytes"]))
    return None


def read_instructpix2pix(path: str, report: Report, strict: bool) -> Iterator[Conversation]:
    for row, rec in enumerate(_parquet_rows(path, ("original_image", "edit_prompt", "edited_image"))):
        where = f"{path}:row {row}"
        source, target = _image_cell(rec["original_image"], where), _image_cell(rec["edited_image"], where)
        if source is None or target is None:
            report.skip("edit record without both images", where, strict)
            continue
        if not isinstance(rec["edit_prompt"], str) or not rec["edit_prompt"].strip():
            report.skip("edit record without an instruction", where, strict)
            continue
        yield Conversation(where, [Turn(USER, rec["edit_prompt"].strip(), [source]), Turn(ASSISTANT, "", [target])])


def read_magicbrush(path: str, report: Report, strict: bool) -> Iterator[Conversation]:
    groups: Dict[object, List] = {}
    for row, rec in enumerate(_parquet_rows(path, ("img_id", "turn_index", "source_img", "instruction", "target_img"))):
        groups.setdefault(rec["img_id"], []).append((row, rec))
    for img_id, rows in groups.items():
        rows.sort(key=lambda r: (r[1]["turn_index"] is None, r[1]["turn_index"]))
        where = f"{path}:img_id {img_id} (rows {', '.join(str(r) for r, _ in rows)})"
        indices = [rec["turn_index"] for _, rec in rows]
        if not all(isinstance(i, int) for i in indices) or len(set(indices)) != len(indices):
            report.skip("turn_index missing or repeated", f"{where}: {indices}", strict)
            continue
        turns: List[Turn] = []
        for n, (row, rec) in enumerate(rows):
            instruction = rec["instruction"]
            target = _image_cell(rec["target_img"], f"{path}:row {row}")
            source = _image_cell(rec["source_img"], f"{path}:row {row}") if n == 0 else None
            if target is None or (n == 0 and source is None):
                turns = []
                report.skip("edit record without both images", f"{path}:row {row} (img_id {img_id})", strict)
                break
            if not isinstance(instruction, str) or not instruction.strip():
                turns = []
                report.skip("edit record without an instruction", f"{path}:row {row} (img_id {img_id})", strict)
                break
            turns += [Turn(USER, instruction.strip(), [source] if source else []), Turn(ASSISTANT, "", [target])]
        if turns:
            yield Conversation(where, turns)


def read_conversations(fmt: str, path: str, report: Report, *, image_root: Optional[str] = None,
                       strict: bool = False, coco_splits: Sequence[str] = ("train", "restval"),
                       seed: int = 0) -> Iterator[Conversation]:
    if fmt == "llava":
        return read_llava(path, image_root, report, strict)
    if fmt == "coco-captions":
        return read_coco_captions(path, image_root, report, strict, coco_splits, seed)
    if fmt == "instructpix2pix":
        return read_instructpix2pix(path, report, strict)
    if fmt == "magicbrush":
        return read_magicbrush(path, report, strict)
    raise ValueError(f"unknown instruction format {fmt!r}")

"""Readers of instruction-tuning data (stage 3), each record becoming a ``Conversation``
(format_registry.py names each format and says which reader reads it).

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
from .records import DataInputError, DataUsageError, ImageRef, Report, guarded

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
    """The checks every format shares: an assistant reply, turns alternating user, assistant
    (a reply before any question, or two questions in a row, would be trained on as nonsense),
    no empty answer."""
    answers = [t for t in conv.turns if t.role == ASSISTANT]
    if not answers:
        report.skip("conversation without an assistant reply", conv.source, strict)
        return None
    for i, turn in enumerate(conv.turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            report.skip("turns out of order (expected user, assistant, user, ...)",
                        f"{conv.source}: turn {i} is the {turn.role}'s", strict)
            return None
    if conv.turns[-1].role != ASSISTANT:
        report.skip("turns out of order (expected user, assistant, user, ...)",
                    f"{conv.source}: last turn {len(conv.turns) - 1} is the user's, without a reply", strict)
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
        raise DataInputError(f"{path}: not a readable LLaVA json list: {exc}") from None
    if not isinstance(records, list):
        raise DataInputError(f"{path}: a LLaVA file is a json list of records, found {type(records).__name__}")
    for i, rec in enumerate(records):
        where = f"{path}:record {i} (id {rec.get('id') if isinstance(rec, dict) else None})"
        conv = guarded(report, where, strict, lambda: _llava_conversation(rec, where, image_root, report, strict))
        if conv is not None:
            yield conv


_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


def _llava_conversation(rec, where: str, image_root: Optional[str], report: Report,
                        strict: bool) -> Optional[Conversation]:
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        report.skip("record without a conversations list", where, strict)
        return None
    turns: List[Turn] = []
    tags, bad = 0, None
    for k, t in enumerate(rec["conversations"]):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            bad = "turn without a string value"
            break
        role = _ROLES.get(t.get("from")) if isinstance(t.get("from"), str) else None
        if role is None:
            bad = f"turn of unknown role {t.get('from')!r}"
            break
        text = t["value"]
        n = text.count(IMAGE_TAG)
        if n and role != USER:
            # LLaVA's images are the user's inputs; the tag would be removed and its image lost.
            report.skip(f"{IMAGE_TAG} in an assistant turn", f"{where}: turn {k}", strict)
            return None
        tags += n
        turns.append(Turn(role, _TAG_WITH_NEWLINE.sub("", text).strip() if n else text.strip()))
        turns[-1].images = ["pending"] * n
    if bad:
        report.skip(bad, where, strict)
        return None
    image = rec.get("image")
    names = [image] if isinstance(image, str) else image if isinstance(image, list) else []
    if image is not None and not (names and all(isinstance(n, str) for n in names)):
        report.skip("image that is not a file name or a list of them", f"{where}: image {image!r}", strict)
        return None
    if tags != len(names):
        report.skip(f"{IMAGE_TAG} count differs from the record's images", f"{where}: {tags} tag(s), "
                    f"{len(names)} image(s)", strict)
        return None
    refs = iter(ImageRef(name=f"{where} {n}", path=os.path.join(image_root or "", n)) for n in names)
    for turn in turns:
        turn.images = [next(refs) for _ in turn.images]
    return _valid(Conversation(where, turns), report, strict)


def read_coco_captions(path: str, image_root: Optional[str], report: Report, strict: bool,
                       splits: Sequence[str] = ("train", "restval"), seed: int = 0) -> Iterator[Conversation]:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataInputError(f"{path}: not a readable Karpathy split json: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataInputError(f"{path}: no 'images' list (the Karpathy dataset_coco.json layout)")
    present = sorted({im["split"] for im in images if isinstance(im, dict) and isinstance(im.get("split"), str)})
    if images and not set(splits) & set(present):
        raise DataUsageError(f"--coco-splits {' '.join(splits)}: {path} has none of them; its splits are "
                             f"{', '.join(present) or '(none)'}")
    for i, im in enumerate(images):
        conv = guarded(report, f"{path}:images[{i}]", strict,
                       lambda: _coco_conversation(path, i, im, image_root, report, strict, splits, seed))
        if conv is not None:
            yield conv


def _coco_conversation(path: str, i: int, im, image_root: Optional[str], report: Report, strict: bool,
                       splits: Sequence[str], seed: int) -> Optional[Conversation]:
    if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
        report.skip("image entry without a filename", f"{path}:images[{i}]", strict)
        return None
    if not isinstance(im.get("filepath"), (str, type(None))):
        report.skip("image entry whose filepath is not a string", f"{path}:images[{i}] (filepath "
                    f"{im['filepath']!r})", strict)
        return None
    name = os.path.join(im.get("filepath") or "", im["filename"])
    where = f"{path}:images[{i}] ({name})"
    if im.get("split") not in splits:
        return None
    sentences = im.get("sentences")
    if sentences is not None and not isinstance(sentences, list):
        report.skip("image entry whose sentences is not a list", f"{where} ({type(sentences).__name__})", strict)
        return None
    captions = [s.get("raw").strip() for s in sentences or []
                if isinstance(s, dict) and isinstance(s.get("raw"), str) and s.get("raw").strip()]
    if not captions:
        report.skip("image without captions", where, strict)
        return None
    prompt = CAPTION_PROMPTS[seeded_choice(seed, name, len(CAPTION_PROMPTS), "prompt")]
    caption = captions[seeded_choice(seed, name, len(captions), "caption")]
    return Conversation(where, [Turn(USER, prompt, [ImageRef(name=where, path=os.path.join(image_root or "", name))]),
                                Turn(ASSISTANT, caption)])


def _parquet_rows(path: str, columns: Sequence[str]) -> Iterator[Dict]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataInputError(f"{path}: unreadable parquet file: {exc}") from None
    missing = set(columns) - set(table.schema_arrow.names)
    if missing:
        raise DataInputError(f"{path}: parquet lacks column(s) {sorted(missing)}")
    row = 0
    try:
        for batch in table.iter_batches(columns=list(columns), batch_size=64):
            for rec in batch.to_pylist():
                yield rec
                row += 1
    except (OSError, ValueError) as exc:   # pyarrow: a damaged page further in (ArrowInvalid, ArrowIOError)
        raise DataInputError(f"{path}: unreadable parquet file at row {row}: {type(exc).__name__}: {exc}") from None


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
        conv = guarded(report, where, strict, lambda: _ip2p_conversation(where, rec, report, strict))
        if conv is not None:
            yield conv


def _ip2p_conversation(where: str, rec: Dict, report: Report, strict: bool) -> Optional[Conversation]:
    source, target = _image_cell(rec["original_image"], where), _image_cell(rec["edited_image"], where)
    if source is None or target is None:
        report.skip("edit record without both images", where, strict)
        return None
    if not isinstance(rec["edit_prompt"], str) or not rec["edit_prompt"].strip():
        report.skip("edit record without an instruction", where, strict)
        return None
    return Conversation(where, [Turn(USER, rec["edit_prompt"].strip(), [source]), Turn(ASSISTANT, "", [target])])


def read_magicbrush(path: str, report: Report, strict: bool) -> Iterator[Conversation]:
    groups: Dict[object, List] = {}
    for row, rec in enumerate(_parquet_rows(path, ("img_id", "turn_index", "source_img", "instruction", "target_img"))):
        if not isinstance(rec["img_id"], (str, int)) or isinstance(rec["img_id"], bool):
            report.skip("edit record whose img_id is not a string or an integer",
                        f"{path}:row {row} (img_id {rec['img_id']!r})", strict)
            continue
        groups.setdefault(rec["img_id"], []).append((row, rec))
    for img_id, rows in groups.items():
        # turn order where it can be told (a turn_index that is not an integer goes last)
        rows.sort(key=lambda r: (0, r[1]["turn_index"]) if isinstance(r[1]["turn_index"], int) else (1, 0))
        where = f"{path}:img_id {img_id} (rows {', '.join(str(r) for r, _ in rows)})"
        conv = guarded(report, where, strict, lambda: _magicbrush_conversation(path, where, img_id, rows, report,
                                                                               strict))
        if conv is not None:
            yield conv


def _magicbrush_conversation(path: str, where: str, img_id, rows: List, report: Report,
                             strict: bool) -> Optional[Conversation]:
    indices = [rec["turn_index"] for _, rec in rows]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices) or len(set(indices)) != len(indices):
        report.skip("turn_index missing or repeated", f"{where}: {indices}", strict)
        return None
    turns: List[Turn] = []
    for n, (row, rec) in enumerate(rows):
        instruction = rec["instruction"]
        target = _image_cell(rec["target_img"], f"{path}:row {row}")
        source = _image_cell(rec["source_img"], f"{path}:row {row}") if n == 0 else None
        if target is None or (n == 0 and source is None):
            report.skip("edit record without both images", f"{path}:row {row} (img_id {img_id})", strict)
            return None
        if not isinstance(instruction, str) or not instruction.strip():
            report.skip("edit record without an instruction", f"{path}:row {row} (img_id {img_id})", strict)
            return None
        turns += [Turn(USER, instruction.strip(), [source] if source else []), Turn(ASSISTANT, "", [target])]
    return Conversation(where, turns) if turns else None

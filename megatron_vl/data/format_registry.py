"""The input formats of tools/preprocess_data.py, by name. Each entry says in one line what the
format's files are, which reader reads them, which options it takes, and whether it is
instruction data (conversations laid out by a template, with a loss mask on the answers).
The tool's --input-format choices and its --help are made from these entries, and
tests/test_format_registry.py checks the README's table of formats against them.

A new format is its reader (formats.py, instruct_formats.py or a module of its own) and one
``register(InputFormat(...))`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .formats import jsonl_text_document, mmc4_document, read_obelics, read_wds_pairs
from .instruct_formats import read_coco_captions, read_instructpix2pix, read_llava, read_magicbrush
from .jsonl import jsonl_lines
from .records import DataUsageError, LineRecord, RawDocument, Report


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may take besides its file and the report; each format reads only the
    fields its entry's ``options`` names (``strict`` applies to all)."""

    image_root: Optional[str] = None
    """Directory holding the image files that records name by path (or by URL hash)."""
    min_sim: float = 0.0
    """Images whose matched similarity is below this are dropped."""
    json_key: str = "text"
    """The key of a jsonl record that holds its text."""
    strict: bool = False
    """A record that would be skipped is an error instead."""
    coco_splits: Tuple[str, ...] = ("train", "restval")
    """The Karpathy splits whose images are taken."""
    seed: int = 0
    """Seed of the per-record choices a reader makes by hash (a caption's phrasing)."""


OPTION_FLAGS = {"image_root": "--image-root", "min_sim": "--min-sim", "json_key": "--json-keys",
                "coco_splits": "--coco-splits", "seed": "--seed"}
"""The tools/preprocess_data.py flag each option comes from (its --help and the README name them)."""
TEMPLATE_FLAG = "--conversation-template"   # what lays out an instruction format's conversations


@dataclass(frozen=True)
class InputFormat:
    name: str
    """The --input-format value."""
    description: str
    """What its files are, in one line (the tool's --help and the README's table)."""
    read: Callable[[str, Report, ReadOptions], Iterable]
    """The records of one input file, in order: RawDocuments, Conversations (instruction
    formats), or raw records that ``parse`` turns into RawDocuments."""
    parse: Optional[Callable[[Any, Report, ReadOptions], Optional[RawDocument]]] = None
    """A raw record -> its RawDocument (None: skipped, counted in the report). Runs in the
    tokenizing workers, so the parsing is spread over them; sent to them by reference, so it
    is a module-level function. None: ``read`` yields documents already."""
    instruct: bool = False
    """Instruction data: conversations laid out by a template, with a loss mask on the answers."""
    images: bool = True
    """Writes the image spans and the image table (False: the token files alone)."""
    options: Tuple[str, ...] = ()
    """The ReadOptions fields it reads (besides ``strict``)."""

    def flags(self) -> List[str]:
        """The tool flags this format reads, besides those every format reads."""
        return [OPTION_FLAGS[o] for o in self.options] + ([TEMPLATE_FLAG] if self.instruct else [])


_FORMATS: Dict[str, InputFormat] = {}


def register(fmt: InputFormat) -> InputFormat:
    """Adds a format; the tool's --input-format accepts it from then on."""
    known = {f.name for f in fields(ReadOptions)} - {"strict"}
    if not fmt.name or fmt.name in _FORMATS:
        raise ValueError(f"input format {fmt.name!r} is {'already registered' if fmt.name else 'unnamed'}")
    if not fmt.description or "\n" in fmt.description or "|" in fmt.description:
        raise ValueError(f"input format {fmt.name}: the description is one line without '|' (a README table cell)")
    if set(fmt.options) - known:
        raise ValueError(f"input format {fmt.name}: unknown option(s) {sorted(set(fmt.options) - known)}; "
                         f"ReadOptions has {sorted(known)}")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Removes a format (one a test registered)."""
    del _FORMATS[name]


def format_names() -> List[str]:
    """Every format's name, in the order they were registered."""
    return list(_FORMATS)


def input_format(name: str) -> InputFormat:
    """The format registered under `name`; an unknown name is a DataUsageError listing the known ones."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise DataUsageError(f"unknown input format {name!r}: the formats are {', '.join(_FORMATS)}") from None


# --- the formats ------------------------------------------------------------------------------
# The adapters below are module-level functions (not lambdas) where they reach the workers.

def _jsonl_records(path: str, report: Report, options: ReadOptions) -> Iterable[LineRecord]:
    return (LineRecord(where, raw) for where, raw in jsonl_lines(path, report, options.strict))


def _mmc4_document(record: LineRecord, report: Report, options: ReadOptions) -> Optional[RawDocument]:
    return mmc4_document(record, options.image_root or "", options.min_sim, report, options.strict)


def _jsonl_text_document(record: LineRecord, report: Report, options: ReadOptions) -> Optional[RawDocument]:
    return jsonl_text_document(record, options.json_key, report, options.strict)


register(InputFormat(
    "mmc4", "MMC4 jsonl, or its distributed .jsonl.zip shards; each image a file under the image root named by "
    "image_name, attached to its matched_text_index sentence unless its matched_sim is below the minimum",
    read=_jsonl_records, parse=_mmc4_document, options=("image_root", "min_sim")))
register(InputFormat(
    "obelics", "OBELICS parquet (aligned texts / images lists); an image is bytes in the row or a file under the "
    "image root named sha1(url) with any extension, attached to the next text",
    read=lambda path, report, o: read_obelics(path, o.image_root, report, o.strict), options=("image_root",)))
register(InputFormat(
    "wds-pairs", "img2dataset webdataset tars (NNNNN.jpg + .txt + .json, read with webdataset): one caption and its "
    "image per document",
    read=lambda path, report, o: read_wds_pairs(path, report, o.strict)))
register(InputFormat(
    "jsonl-text", "Megatron-style jsonl, text only: one document per line, its text under the json key "
    "(one dataset per key)",
    read=_jsonl_records, parse=_jsonl_text_document, images=False, options=("json_key",)))
register(InputFormat(
    "llava", "the LLaVA json list (also SVIT's LLaVA-format release): human/gpt conversations, the image (a path "
    "under the image root) in the turn that holds the image tag",
    read=lambda path, report, o: read_llava(path, o.image_root, report, o.strict), instruct=True,
    options=("image_root",)))
register(InputFormat(
    "coco-captions", "the Karpathy split dataset_coco.json: one caption conversation per image of the chosen "
    "splits, its question phrasing and its caption picked by a seeded hash",
    read=lambda path, report, o: read_coco_captions(path, o.image_root, report, o.strict, o.coco_splits, o.seed),
    instruct=True, options=("image_root", "coco_splits", "seed")))
register(InputFormat(
    "instructpix2pix", "InstructPix2Pix parquet (original_image, edit_prompt, edited_image): input image and "
    "instruction, the edited image as the answer",
    read=lambda path, report, o: read_instructpix2pix(path, report, o.strict), instruct=True))
register(InputFormat(
    "magicbrush", "MagicBrush parquet (img_id, turn_index, source_img, instruction, target_img): the turns of an "
    "img_id as one multi-turn editing conversation, each target image an answer",
    read=lambda path, report, o: read_magicbrush(path, report, o.strict), instruct=True))

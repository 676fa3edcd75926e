"""Names and markers of a checkpoint directory, shared by every writer and reader.

A training run's ``--save DIR`` holds tag directories ``iter_0000100/``; ``DIR/latest`` names
the newest complete one ("release" for a converted checkpoint, weights only). A tag directory
holds ``stage.json`` (which stage wrote it), ``manifest.json`` (every file with its size,
written just before ``latest``) and, for a stage-1 run, the exported ``image_tokenizer/`` and
``image_detokenizer/`` folders. ``training.lock`` guards a directory a run is writing and
``origin.json`` says where that run started (training/save_rules.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional

from ..atomic import atomic_open
from ..errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint (or export) that cannot be read or written as asked: one line naming it."""


LATEST = "latest"
RELEASE = "release"
_TAG = re.compile(r"iter_(\d{7,})$")
LOCK = "training.lock"
MANIFEST = "manifest.json"
ORIGIN = "origin.json"   # where the run that wrote a checkpoint started (save_rules.run_origin)
STAGE_FILE = "stage.json"
META_FILE = "megatron_vl_checkpoint.json"   # a release checkpoint's model config and layout
STAGE_NAMES = {"tokenizer": "stage-1 (image tokenizer, train_tokenizer.py)",
               "pretrain": "stage-2 (pretraining, pretrain_vlgpt.py)",
               "instruct": "stage-3 (instruction tuning, finetune_instruct.py)"}
# The two halves of the image tokenizer, as folders of a stage-1 checkpoint tag and of an export.
IMAGE_TOKENIZER_DIR = "image_tokenizer"
IMAGE_DETOKENIZER_DIR = "image_detokenizer"
STAGE1_PARTS = (IMAGE_TOKENIZER_DIR, IMAGE_DETOKENIZER_DIR)


def read_json_object(path: str, missing: Callable[[], str]) -> dict:
    """A checkpoint's JSON file as a dict; missing (`missing()` says what that means: asked only
    then, it may look around), damaged or not an object is one CheckpointError naming it."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(missing()) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def tag_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def tag_iteration(tag: Optional[str]) -> Optional[int]:
    m = _TAG.match(tag or "")
    return int(m.group(1)) if m else None


def list_tags(save_dir: str):
    """Iterations of the tag directories in save_dir, ascending."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _TAG.match(n)) and os.path.isdir(os.path.join(save_dir, n)))


def read_latest(load_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(load_dir, LATEST), errors="replace") as fh:
            return fh.read(4096).strip() or None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def is_release(load_dir: str) -> bool:
    """A release checkpoint (tools/convert_checkpoint.py import-hf): weights only."""
    return read_latest(load_dir) == RELEASE


def write_stage(tag_dir: str, stage: str) -> None:
    with atomic_open(os.path.join(tag_dir, STAGE_FILE)) as fh:
        json.dump({"stage": stage}, fh)


def read_stage(load_dir: str, ckpt_step: Optional[int] = None) -> Optional[str]:
    """The stage that wrote the checkpoint --load names ('pretrain', 'instruct'), None when
    unrecorded (written before stages were recorded: pretraining) or absent."""
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None or tag == RELEASE:
        return None
    try:
        with open(os.path.join(load_dir, tag, STAGE_FILE)) as fh:
            return json.load(fh).get("stage")
    except (OSError, ValueError):
        return None


def write_manifest(tag_dir: str) -> None:
    """Every file of the finished checkpoint with its size (rank 0, after every rank wrote)."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for n in names:
            f = os.path.join(root, n)
            rel = os.path.relpath(f, tag_dir)
            if rel != MANIFEST:
                files[rel] = os.path.getsize(f)
    with atomic_open(os.path.join(tag_dir, MANIFEST)) as fh:
        json.dump({"files": files}, fh, indent=0, sort_keys=True)

"""The files of a dataset prefix (Megatron's indexed binaries plus the multimodal sidecars),
their metadata, the lock a writer holds, and the guard that keeps outputs off inputs.

For a dataset prefix ``P`` (``{output_prefix}_{key}_document``, Megatron's naming):

- ``P.bin/.idx``              text tokens, one sequence per document (MMIDIDX; uint16 when the
                              vocabulary fits, int32 otherwise) — what Megatron's tools read
- ``P_images.bin/.idx``       int64 MMIDIDX, one sequence per document: (start, end, image)
                              triples — the token span of the sentence an image belongs to
                              and its row in the image table
- ``P_image_table.bin/.idx``  uint8 MMIDIDX, one sequence per image: its encoded bytes
- ``P_loss_mask.bin/.idx``    uint8 MMIDIDX, instruction data only, one sequence per document:
                              1 per answer token, 0 per context token, then one flag per
                              image in span order (1: an image the assistant produces)
- ``P.meta.json``             tokenizer (with the ``[IMG]``/``[/IMG]`` ids), format, report,
                              the conversation template, the content fingerprint of each
                              of the files, and the smallest and largest token id written
                              (``token_ids``: training compares them with the vocabulary
                              in O(1) instead of reading the whole ``.bin``)
- ``P_image_features.*``      written later by tools/extract_image_features.py, tied to the
                              image table's fingerprint
- ``P.lock``                  present while a run writes the prefix (a second run is refused)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from ..atomic import exclusive_lock, guard_output
from ..errors import InputError, OutputError
from .records import DataInputError

META_VERSION = 2   # 2: content fingerprints


def sidecar(prefix: str, kind: str) -> str:
    return {"images": f"{prefix}_images", "table": f"{prefix}_image_table", "loss_mask": f"{prefix}_loss_mask",
            "features": f"{prefix}_image_features", "meta": f"{prefix}.meta.json", "lock": f"{prefix}.lock"}[kind]


def prefix_lock(prefix: str):
    """Held while a run writes `prefix` or its derived files: a concurrent second run on the
    same prefix is refused, naming the first."""
    return exclusive_lock(sidecar(prefix, "lock"), f"dataset prefix {prefix}")


def table_fingerprint(prefix: str, meta: Optional[Dict] = None) -> str:
    """The image table's content fingerprint, which a feature store must carry."""
    return (meta or read_meta(prefix))["fingerprint"]["table"]


class MetaMissing(InputError, FileNotFoundError):
    """A dataset prefix without its .meta.json."""


def read_meta(prefix: str) -> Dict:
    path = sidecar(prefix, "meta")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise MetaMissing(f"{path}: dataset metadata missing (was {prefix} written by "
                          f"tools/preprocess_data.py?)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataInputError(f"{path}: unreadable dataset metadata ({exc})") from None
    version = meta.get("version") if isinstance(meta, dict) else None
    if version != META_VERSION or "fingerprint" not in meta:
        raise DataInputError(f"{path}: metadata version {version} has no content fingerprints (this code "
                             f"reads version {META_VERSION}); re-run tools/preprocess_data.py for {prefix}")
    return meta


def open_meta(prefix: str) -> Dict:
    """The dataset metadata of `prefix`; a missing or unreadable one is an InputError naming it."""
    try:
        return read_meta(prefix)
    except FileNotFoundError as exc:
        if not any(os.path.exists(prefix + ext) for ext in (".idx", ".bin")):
            raise InputError(f"{prefix}: no dataset there ({prefix}.idx, .bin and .meta.json not found; "
                             "--data-path takes the prefix tools/preprocess_data.py wrote)") from None
        raise InputError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise InputError(str(exc)) from None


def dataset_files(prefix: str) -> List[str]:
    """The files of a dataset prefix, feature store included."""
    bases = [prefix] + [sidecar(prefix, k) for k in ("images", "table", "loss_mask", "features")]
    return [b + ext for b in bases for ext in (".bin", ".idx")] + [sidecar(prefix, "meta")]


def refuse_writing_over(prefix: str, inputs: List[str]) -> None:
    """OutputError when a file of dataset `prefix` would be one of `inputs` (a merge into one
    of its own inputs replaced that input)."""
    if os.path.abspath(prefix) in inputs:
        raise OutputError(f"--output-prefix {prefix} is also an input of this run; choose another name")
    for f in dataset_files(prefix):
        guard_output(f, inputs=[i for i in inputs if os.path.lexists(i)] if os.path.lexists(f) else (),
                     overwrite=True, flag="--output-prefix")


def remove_dataset(prefix: str) -> None:
    for base in (prefix, sidecar(prefix, "images"), sidecar(prefix, "table"), sidecar(prefix, "loss_mask")):
        for ext in (".bin", ".idx"):
            if os.path.exists(base + ext):
                os.remove(base + ext)
    if os.path.exists(sidecar(prefix, "meta")):
        os.remove(sidecar(prefix, "meta"))


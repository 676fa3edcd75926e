"""The directory format our own model parts share (image tokenizer, image detokenizer): a
JSON config named after the part, our weights in ``model.safetensors``.

Every such directory is read through the loaders here, so a damaged or foreign one ends in
one InputError naming the file and what is wrong with it (garbage weights, a truncated or
hand-edited config, a directory of the other part), never in a parser's traceback. The one
opener of images named on a command line lives here too, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Type

from ..errors import InputError


class PartDirectoryError(InputError, FileNotFoundError):
    """A model-part directory that is missing, of another kind, or damaged. Also a
    FileNotFoundError, so callers that report a missing directory keep doing so."""

    def __str__(self) -> str:   # FileNotFoundError would print "(errno) msg" given two args
        return str(self.args[0]) if self.args else ""


# The config file that marks each kind of part directory, for telling them apart.
PART_CONFIGS = {"image_tokenizer_config.json": "image tokenizer", "image_detokenizer_config.json": "image detokenizer"}


def part_kind(path: str):
    """'image tokenizer' / 'image detokenizer' for a part directory, or None."""
    for name, kind in PART_CONFIGS.items():
        if os.path.isfile(os.path.join(path, name)):
            return kind
    return None


def save_part(path: str, config_name: str, cfg, state_dict) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, config_name), "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=2)


def _check_fields(cfg_path: str, cfg) -> None:
    """Integer sizes must be positive: a 0-wide or 0-deep part is a damaged config, not a model."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PartDirectoryError(f"{cfg_path}: {f.name} is {value!r}; it must be a positive integer (damaged or "
                                     "hand-edited config)")


def read_part_config(path: str, config_name: str, cfg_type: Type, what: str):
    cfg_path = os.path.join(path, config_name)
    if not os.path.isdir(path):
        raise PartDirectoryError(f"{path}: no such {what} directory")
    if not os.path.isfile(cfg_path):
        other = part_kind(path)
        found = f"it is an {other} directory" if other else f"{config_name} missing"
        raise PartDirectoryError(f"{path}: not an {what} directory ({found})")
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PartDirectoryError(f"{cfg_path}: not valid JSON ({exc}); the {what} directory is damaged") from None
    if not isinstance(raw, dict):
        raise PartDirectoryError(f"{cfg_path}: expected a JSON object, found {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PartDirectoryError(f"{cfg_path}: unknown key(s) {', '.join(unknown)}: not an {what} config "
                                 "(or written by another version)")
    cfg = cfg_type(**raw)
    _check_fields(cfg_path, cfg)
    return cfg


def load_part_weights(model, path: str, external: Iterable[str] = ()) -> None:
    """Loads model.safetensors strictly, except for parameters under the `external` prefixes
    (frozen parts stored in their own format beside it)."""
    from safetensors.torch import load_file
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise PartDirectoryError(f"{file}: missing (the weights of {path})")
    try:
        weights = load_file(file)
    except Exception as exc:   # safetensors raises its own SafetensorError, OSError, ...
        raise PartDirectoryError(f"{file}: cannot read the weights ({type(exc).__name__}: {exc}); the file is "
                                 "damaged or not a safetensors file") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:   # shape mismatches: the weights belong to another config
        first = str(exc).strip().splitlines()
        raise PartDirectoryError(f"{file}: weights do not match the config beside them "
                                 f"({first[-1].strip() if first else exc})") from None
    missing = [k for k in missing if not k.startswith(tuple(external))]
    if missing or unexpected:
        raise PartDirectoryError(f"{file}: weights do not match the config (missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]})")


def load_pretrained(cls, path: str, what: str, complete: bool = False, hint: str = "", **kwargs):
    """A transformers/diffusers ``cls.from_pretrained(path)``, any failure to parse it turned
    into one line naming the directory. complete (transformers models): weights the directory
    lacks are refused by name (transformers would initialise them at random and go on with a
    note), `hint` appended to that refusal."""
    if not os.path.isdir(path):
        raise PartDirectoryError(f"{path}: no such {what} directory")
    try:
        if not complete:
            return cls.from_pretrained(path, **kwargs)
        from ..console import quiet_load_report
        with quiet_load_report():   # the missing weights are named below; unused ones are expected
            model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as exc:   # noqa: BLE001 - JSON, safetensors, pickle, config errors: all name the directory
        msg = " ".join(str(exc).split())
        raise PartDirectoryError(f"{path}: cannot load the {what} ({type(exc).__name__}: {msg[:300]})") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PartDirectoryError(f"{path}: the {what} lacks weights: {', '.join(missing[:5])}{more} (not in the "
                                 f"directory's weight files; they would be random){hint}")
    return model


def open_image(path: str, flag: str = "--images"):
    """An image file named by the user, as RGB: whatever PIL raises (missing file, cut or
    non-image data, a decompression bomb) becomes an InputError naming the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{flag} {path}: too large to decode safely ({exc})") from None
    except Exception as exc:   # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        raise InputError(f"{flag} {path}: not a readable image ({type(exc).__name__}: {exc})") from None

"""The directory format our own model parts share (image tokenizer, image detokenizer): a
JSON config named after the part, our weights in ``model.safetensors``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Type


def save_part(path: str, config_name: str, cfg, state_dict) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, config_name), "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=2)


def read_part_config(path: str, config_name: str, cfg_type: Type, what: str):
    cfg_path = os.path.join(path, config_name)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: not an {what} directory ({config_name} missing)")
    with open(cfg_path) as fh:
        return cfg_type(**json.load(fh))


def load_part_weights(model, path: str, external: Iterable[str] = ()) -> None:
    """Loads model.safetensors strictly, except for parameters under the `external` prefixes
    (frozen parts stored in their own format beside it)."""
    from safetensors.torch import load_file
    missing, unexpected = model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith(tuple(external))]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")

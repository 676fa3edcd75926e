"""Named model presets (--model-preset NAME): YAML files in the config layout, one per model
size, shipped with the package in megatron_vl/config/presets/ (NAME.yaml; examples/configs is a
link to it). Adding a size is adding a file."""

from __future__ import annotations

import os
from typing import List

from .fields import ConfigError

# Package data (setup.py), so a plain `pip install .` has them too.
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
SUFFIX = ".yaml"


def preset_names(directory: str = PRESET_DIR) -> List[str]:
    """The presets a directory offers, sorted (empty when it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name[:-len(SUFFIX)] for name in os.listdir(directory)
                  if name.endswith(SUFFIX) and os.path.isfile(os.path.join(directory, name)))


def preset_path(value: str, directory: str = PRESET_DIR) -> str:
    """The file --model-preset VALUE names: a preset's name, or a YAML file's path."""
    names = preset_names(directory)
    if value in names:
        return os.path.join(directory, value + SUFFIX)
    if value.endswith((".yaml", ".yml")) or os.sep in value:
        if not os.path.isfile(value):
            raise ConfigError(f"--model-preset {value}: no such file")
        return value
    raise ConfigError(f"--model-preset {value}: no such preset; choose one of {', '.join(names) or '(none found)'} "
                      f"(files in {directory}) or give a YAML file's path")


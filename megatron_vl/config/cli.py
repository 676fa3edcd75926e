"""The command line of every entry point: one flag per config field, grouped by section, and
the layers a config is read from. Precedence: defaults < --model-preset < --config YAML <
the flags typed."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Set, get_args, get_origin, get_type_hints

import yaml

from ..atomic import atomic_open
from .fields import ConfigError, apply_nested, base_type, flag_name, section_types
from .presets import preset_names, preset_path
from .sections import Config


def build_parser(description: str = "", parser: Optional[argparse.ArgumentParser] = None,
                 config_cls=Config) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, grouped by section. Defaults are
    suppressed so that only flags the user typed override the YAML file."""
    parser = parser or argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with {section: {field: value}}; flags override it.")
    if config_cls.PRESET_DIR is not None:
        names = preset_names(config_cls.PRESET_DIR)
        parser.add_argument(
            "--model-preset", metavar="NAME|FILE",
            help=f"Model size preset: {', '.join(names) or '(none found)'} ({_short(config_cls.PRESET_DIR)}/NAME.yaml), "
            "or a YAML file of the same layout. It is the lowest layer: --config YAML overrides it, flags "
            "override both.")
    # The deepspeed launcher appends --local_rank=N; accept and ignore it (env LOCAL_RANK wins).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for section, section_type in section_types(config_cls).items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(section_type)
        defaults = section_type()
        for f in dataclasses.fields(section_type):
            tp = base_type(hints[f.name])
            kwargs: Dict[str, Any] = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                                          metavar=None if tp is bool or f.metadata.get("choices") else f.name.upper(),
                                          help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(tp) in (list, List):
                kwargs["nargs"] = "*"
                kwargs["type"] = get_args(tp)[0]
            else:
                kwargs["type"] = tp
                choices = f.metadata.get("choices")
                if choices:
                    kwargs["choices"] = [c for c in choices if c is not None] + (
                        ["none"] if None in choices else [])
                    if None in choices:
                        kwargs["type"] = lambda s: None if s == "none" else s
            group.add_argument(flag_name(f), **kwargs)
    return parser


def _short(directory: str) -> str:
    """A presets directory as --help shows it: its last two components (config/presets)."""
    return os.path.join(os.path.basename(os.path.dirname(directory)), os.path.basename(directory))


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML file of {section: {field: value}} as a mapping ({} when empty)."""
    with open(path) as fh:
        try:
            return yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _layers(ns, config_cls) -> List[tuple]:
    """(source, {section: {field: value}}) of the files the flags name, lowest first."""
    layers = []
    preset = getattr(ns, "model_preset", None)
    if preset:
        path = preset_path(preset, config_cls.PRESET_DIR)
        layers.append((path, read_yaml(path)))
    if ns.config:
        layers.append((ns.config, read_yaml(ns.config)))
    return layers


def _typed(ns) -> Dict[str, Dict[str, Any]]:
    """The flags typed, as {section: {field: value}} (their dests are 'section.field')."""
    overrides: Dict[str, Dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    return overrides


def load_config(argv: Optional[Sequence[str]] = None, description: str = "",
                parser: Optional[argparse.ArgumentParser] = None, config_cls=Config):
    """Parses flags (and the preset and YAML they name) into a config_cls. Returns (config,
    namespace) so an entry script can read its own extra flags from the namespace."""
    parser = parser or build_parser(description, config_cls=config_cls)
    ns = parser.parse_args(argv)
    cfg = config_cls()
    for source, data in _layers(ns, config_cls):
        apply_nested(cfg, data, source)
    apply_nested(cfg, _typed(ns), "command line")
    return cfg, ns


def given_settings(ns, config_cls=Config) -> Set[str]:
    """'section.field' of every setting the user gave: typed, or in the --config YAML or the
    --model-preset file (call after load_config, which has read and checked them)."""
    given = {f"{section}.{key}" for section, values in _typed(ns).items() for key in values}
    for _, data in _layers(ns, config_cls):
        given |= {f"{section}.{key}" for section, values in data.items() for key in (values or {})}
    return given


def save_yaml(cfg, path: str) -> None:
    with atomic_open(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)

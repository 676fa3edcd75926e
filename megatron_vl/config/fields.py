"""How a setting is declared (``opt``) and how a {section: {field: value}} mapping — a YAML
file, a preset, the flags typed — is applied to a config made of section dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Dict, List, Optional, Sequence, get_args, get_origin, get_type_hints

from ..errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration that cannot run; the message says which settings disagree and why."""


def opt(default: Any = None, help: str = "", *, flag: Optional[str] = None,
        choices: Optional[Sequence[Any]] = None, factory=None, low: Optional[float] = None,
        above: Optional[float] = None, below: Optional[float] = None):
    """Declares a config field: its default, its help text (shown by --help), where
    Megatron's flag name is not the field name with dashes, that flag, and the range its
    values must lie in (``low`` <= v, ``above`` < v, v < ``below``), checked by validate()
    for every entry point (a list field: each item)."""
    meta = {"help": help, "flag": flag, "choices": choices, "low": low, "above": above, "below": below}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def range_text(meta) -> str:
    """A field's declared range as the error messages say it, e.g. '>= 0 and < 1'."""
    low, above, below = meta.get("low"), meta.get("above"), meta.get("below")
    parts = ([f">= {low:g}"] if low is not None else []) + ([f"> {above:g}"] if above is not None else []) + \
        ([f"< {below:g}"] if below is not None else [])
    return " and ".join(parts)


def section_types(config_cls) -> Dict[str, type]:
    """{section name: its dataclass} of a top-level config (Config, or another entry point's)."""
    hints = get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def base_type(tp):
    """Optional[X] -> X; List[X] stays a list type."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def coerce(value: Any, tp, where: str):
    base = base_type(tp)
    if value is None:
        return None
    if get_origin(base) in (list, List):
        if isinstance(value, str):
            value = value.split()
        item = get_args(base)[0]
        return [coerce(v, item, where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if base is float and isinstance(value, (int, float, str)):
            return float(value)
        if base is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
    except ValueError:
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}") from None
    return value


def apply_nested(cfg, data: Dict[str, Any], source: str) -> None:
    """Applies a {section: {field: value}} mapping (the YAML layout) onto cfg."""
    sections = list(section_types(type(cfg)))
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {sections}")
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; known: {sections}")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        for key, value in (values or {}).items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            setattr(obj, key, coerce(value, hints[key], f"{source}: {section}.{key}"))

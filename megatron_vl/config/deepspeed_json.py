"""The DeepSpeed JSON: derived from the config, merged with the user's --deepspeed_config; a
key both set to different values is an error naming both."""

from __future__ import annotations

import json
from typing import Any, Dict

from .fields import ConfigError
from .layout import data_parallel_size, effective_zero_stage, gradient_accumulation_steps


def deepspeed_config(cfg, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON derived from cfg (any entry point's config with parallel,
    training, optimizer and logging sections), merged with the user's --deepspeed_config.
    Every key we derive is written explicitly (DeepSpeed's own defaults differ from ours,
    e.g. it clips gradients at 1.0 when gradient_clipping is absent)."""
    cfg.validate(world_size)
    t, o = cfg.training, cfg.optimizer
    dp = data_parallel_size(cfg, world_size)
    gas = gradient_accumulation_steps(cfg, world_size)
    derived: Dict[str, Any] = {
        "train_batch_size": t.micro_batch_size * gas * dp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.clip_grad,
        "steps_per_print": cfg.logging.log_interval,
        "zero_optimization": {"stage": effective_zero_stage(cfg)},
        "bf16": {"enabled": t.bf16},
        "fp16": {"enabled": t.fp16},
        "wall_clock_breakdown": False,
    }
    if t.fp16:
        derived["fp16"].update({"loss_scale": 0, "initial_scale_power": 16,
                                "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1})
    if not t.deepspeed_config:
        return derived
    return merge_deepspeed(derived, user_deepspeed_json(cfg), t.deepspeed_config)


def user_deepspeed_json(cfg) -> Dict[str, Any]:
    """The user's --deepspeed_config JSON as written, or {} without one."""
    path = cfg.training.deepspeed_config
    if not path:
        return {}
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--deepspeed_config {path}: {exc}") from None


def merge_deepspeed(derived: Dict[str, Any], user: Dict[str, Any], source: str,
                    prefix: str = "") -> Dict[str, Any]:
    merged = dict(derived)
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in derived:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(derived[key], dict):
            merged[key] = merge_deepspeed(derived[key], value, source, path + ".")
        elif value == "auto" or value == derived[key]:
            merged[key] = derived[key]
        else:
            raise ConfigError(
                f"{source}: {path} = {value!r} conflicts with the value derived from the flags "
                f"({derived[key]!r}); change the flag or remove the key from the JSON")
    return merged

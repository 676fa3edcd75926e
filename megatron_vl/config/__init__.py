"""One configuration system for every entry point.

Each setting is a dataclass field declared once with its help text (sections.py); the
command-line flag (Megatron's name: ``num_layers`` -> ``--num-layers``), the YAML key
(``section.field``) and the DeepSpeed JSON entries are all derived from these declarations.
Precedence is defaults < --model-preset (presets.py) < YAML file (``--config``) < flags
(cli.py); a user's ``--deepspeed_config`` JSON is merged into the derived one and any
disagreement is an error naming both values (deepspeed_json.py). checks.py refuses settings
that cannot run.

The package is a leaf: it imports nothing of ours but megatron_vl.atomic and megatron_vl.errors.
"""

from .checks import path_errors, raise_errors, range_errors, split_weights, training_errors, validate
from .cli import build_parser, given_settings, load_config, read_yaml, save_yaml
from .deepspeed_json import deepspeed_config, merge_deepspeed, user_deepspeed_json
from .fields import ConfigError, apply_nested, flag_name, opt
from .layout import data_parallel_size, effective_zero_stage, gradient_accumulation_steps
from .presets import PRESET_DIR, preset_names, preset_path
from .sections import (SECTIONS, CheckpointConfig, Config, DataConfig, DataParallelConfig, LoggingConfig,
                       LoopConfig, LoraConfig, ModelConfig, OptimizerConfig, ParallelConfig, Sections,
                       TrainingConfig)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DataParallelConfig", "LoggingConfig",
    "LoopConfig", "LoraConfig", "ModelConfig", "OptimizerConfig", "PRESET_DIR", "ParallelConfig", "SECTIONS",
    "Sections", "TrainingConfig", "apply_nested", "build_parser", "data_parallel_size", "deepspeed_config",
    "effective_zero_stage", "flag_name", "given_settings", "gradient_accumulation_steps", "load_config",
    "merge_deepspeed", "opt", "path_errors", "preset_names", "preset_path", "raise_errors", "range_errors",
    "read_yaml", "save_yaml", "split_weights", "training_errors", "user_deepspeed_json", "validate",
]

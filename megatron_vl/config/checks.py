"""Settings that cannot run, refused before any process-group work: every declared range,
and the rules between settings (divisibility, batch split, precision, paths)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, List, Sequence

from .fields import ConfigError, flag_name, range_text, section_types
from .layout import data_parallel_size


def range_errors(cfg) -> List[str]:
    """Every declared field range (opt's low/above/below) a value of cfg falls outside: one
    line per flag, e.g. '--micro-batch-size 0: must be >= 1'. Any entry point's config."""
    errors = []
    for section in section_types(type(cfg)):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            meta = f.metadata
            value = getattr(obj, f.name)
            # No setting means anything at infinity or NaN: refused for every float field.
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, (list, tuple)) else [value])):
                errors.append(f"{flag_name(f)} {value!r}: must be a finite number")
                continue
            if meta.get("low") is None and meta.get("above") is None and meta.get("below") is None:
                continue
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if (meta.get("low") is not None and not v >= meta["low"]) or \
                        (meta.get("above") is not None and not v > meta["above"]) or \
                        (meta.get("below") is not None and not v < meta["below"]):
                    errors.append(f"{flag_name(f)} {v!r}: must be {range_text(meta)}")
                    break
    return errors


def split_weights(split: str) -> List[float]:
    """Megatron's --split "98,2,0" (or "98/2/0") as three weights, missing ones 0."""
    form = "expected up to three non-negative numbers with a positive sum, e.g. 98,2,0"
    try:
        weights = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split {split!r}: {form}") from None
    if len(weights) > 3 or any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--split {split!r}: {form}")
    return weights + [0.0] * (3 - len(weights))


def path_errors(cfg) -> List[str]:
    """Output/input directories that name something else (a file where a directory must be)."""
    errors = []
    for flag, path in (("--save", cfg.checkpoint.save), ("--load", cfg.checkpoint.load),
                       ("--tensorboard-dir", cfg.logging.tensorboard_dir),
                       ("--data-cache-path", getattr(cfg.data, "data_cache_path", None))):
        if path and os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"{flag} {path}: is a file, not a directory")
    return errors


def validate(cfg, world_size: int, extra_checks: Sequence[Callable[[object], List[str]]] = ()) -> None:
    """Refuses settings of a Config (pretraining, instruction tuning) that cannot run, before
    any process-group work is done. `extra_checks` are the rules of other parts (the
    evaluation tasks), reported in the same list."""
    # Out-of-range values first: the checks below divide by some of them.
    raise_errors(range_errors(cfg))
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    errors = []
    try:
        split_weights(cfg.data.split)
    except ConfigError as exc:
        errors.append(str(exc))
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        errors.append(f"--max-position-embeddings ({m.max_position_embeddings}) is below --seq-length "
                      f"({m.seq_length}): positions past it would have no rotary table")
    block = cfg.data.num_image_tokens + 2
    if block > m.seq_length:
        errors.append(f"--seq-length ({m.seq_length}) is shorter than one image block ([IMG] + --num-image-tokens "
                      f"{cfg.data.num_image_tokens} + [/IMG] = {block} positions)")
    errors += path_errors(cfg)
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
                      f"x --pipeline-model-parallel-size ({pp})")
    heads, kv = ("--num-attention-heads", m.num_attention_heads), ("--num-query-groups", m.kv_heads)
    tp_size, pp_size = ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)
    for (flag, size), (by_flag, by) in ((("--hidden-size", m.hidden_size), heads), (heads, tp_size), (kv, tp_size),
                                        (heads, kv), (("--ffn-hidden-size", m.ffn_hidden_size), tp_size),
                                        (("--num-layers", m.num_layers), pp_size)):
        if size % by:
            errors.append(f"{flag} ({size}) must be divisible by {by_flag} ({by})")
    if p.zero_stage >= 2 and pp > 1:
        errors.append(f"--zero-stage {p.zero_stage} with --pipeline-model-parallel-size {pp}: DeepSpeed "
                      "cannot combine ZeRO-2/3 with pipeline parallelism (it partitions gradients that "
                      "the pipeline engine accumulates across micro-batches). Use --zero-stage 1 with "
                      "pipelines, or --pipeline-model-parallel-size 1 with ZeRO-3.")
    if m.rope_scaling_type not in (None, "llama3"):
        errors.append(f"--rope-scaling-type {m.rope_scaling_type!r}: expected none or llama3")
    if not errors and tp * pp <= world_size:
        errors += training_errors(cfg, world_size, check_paths=False)   # (checked above)
    for check in extra_checks:
        errors += check(cfg)
    raise_errors(errors)


def training_errors(cfg, world_size: int, check_paths: bool = True) -> List[str]:
    """What any entry point's training/batch settings get wrong (precision, batch split), and
    with `check_paths` its checkpoint and log paths."""
    t = cfg.training
    errors = range_errors(cfg)
    if errors:   # (the batch arithmetic below divides by these)
        return errors
    if check_paths and getattr(cfg, "checkpoint", None) is not None:
        errors += path_errors(cfg)
    if t.bf16 and t.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    o = getattr(cfg, "optimizer", None)
    if o is not None and o.min_lr > o.lr:
        errors.append(f"--min-lr ({o.min_lr}) is above --lr ({o.lr}): the decay would raise the learning rate")
    dp = data_parallel_size(cfg, world_size)
    gbs = t.global_batch_size
    if dp >= 1 and gbs is not None and gbs % (t.micro_batch_size * dp):
        errors.append(
            f"--global-batch-size ({gbs}) must equal --micro-batch-size ({t.micro_batch_size}) x "
            f"gradient accumulation steps x data-parallel size ({dp}); {gbs} is not a multiple of "
            f"{t.micro_batch_size * dp}")
    return errors


def raise_errors(errors: List[str]) -> None:
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

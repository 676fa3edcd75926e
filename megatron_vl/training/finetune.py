"""Stage 3, instruction tuning, on the pretraining engine (finetune_instruct.py is its entry
point). What differs from pretraining is checked and decided here, before the run starts:

- the data must be instruction data (preprocessed with an instruction --input-format: it
  carries the loss mask, so the loss covers the answers only);
- one conversation never attends to another (--reset-attention-mask is always on);
- --load of a stage-2 checkpoint (or of any checkpoint not written by this stage) takes its
  weights only (Megatron's --finetune: LoRA adapters and [IMG]/[/IMG] rows merged, fresh
  optimizer, schedule and data position; stage 3 then trains new adapters); --load of a
  stage-3 checkpoint resumes it; a release checkpoint (import-hf) loads as in pretraining;
  a stage-1 (image tokenizer) checkpoint is refused by name;
- no --load is refused (instruction tuning random weights is a mistake) unless
  --allow-random-init says it is meant.
"""

from __future__ import annotations

from ..checkpoint.layout import is_release, read_latest, read_stage
from ..config import Config, ConfigError
from ..data.dataset import open_meta, parse_blend
from ..data.format_registry import format_names, input_format
from . import save_rules


STAGE = "instruct"
# The paper's stage-3 recipe, before the user's flags (which override them).
DEFAULTS = ["--lora-rank", "16", "--lora-alpha", "32", "--lr", "5e-5", "--min-lr", "0"]


def _instruction_formats() -> str:
    names = [n for n in format_names() if input_format(n).instruct]
    return ", ".join(names[:-1]) + " or " + names[-1]


def prepare(cfg: Config, *, allow_random_init: bool = False) -> None:
    errors = []
    for prefix in parse_blend(cfg.data.data_path)[0] if cfg.data.data_path else []:
        meta = open_meta(prefix)   # missing or unreadable: one line naming it, exit 1 (as in stage 2)
        if not meta.get("loss_mask"):
            errors.append(f"{prefix}: not instruction data (no loss mask; format {meta.get('format')!r}): "
                          f"preprocess it with --input-format {_instruction_formats()}")
    if not cfg.data.reset_attention_mask:
        errors.append("--no-reset-attention-mask: instruction tuning keeps each conversation to itself")
    c = cfg.checkpoint
    if not c.load and not allow_random_init:
        errors.append("no --load: stage 3 tunes a stage-2 checkpoint: pass --load DIR (pretrain_vlgpt.py's --save, "
                      "or a release checkpoint), or --allow-random-init to tune randomly initialised weights")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    save_rules.check_load_stage(c.load, c.ckpt_step, STAGE)
    if c.load and not is_release(c.load) and read_latest(c.load) is not None:
        c.finetune = read_stage(c.load, c.ckpt_step) != STAGE

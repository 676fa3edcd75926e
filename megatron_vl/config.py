"""One configuration system for every entry point.

Each setting is a dataclass field declared once with its help text; the command-line flag
(Megatron's name: ``num_layers`` -> ``--num-layers``), the YAML key (``section.field``) and
the DeepSpeed JSON entries are all derived from these declarations. Precedence is
defaults < YAML file (``--config``) < flags; a user's ``--deepspeed_config`` JSON is merged
into the derived one and any disagreement is an error naming both values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, get_args, get_origin, get_type_hints

import yaml

from .atomic import atomic_open
from .errors import UsageError


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


@dataclass
class ModelConfig:
    num_layers: int = opt(2, "Number of transformer layers.", low=1)
    hidden_size: int = opt(64, "Transformer hidden size.", low=1)
    ffn_hidden_size: int = opt(176, "Width of the SwiGLU MLP's inner projection.", low=1)
    num_attention_heads: int = opt(4, "Number of attention (query) heads.", low=1)
    num_query_groups: Optional[int] = opt(
        None, "Number of key/value heads for grouped-query attention; default: one per query head.", low=1)
    seq_length: int = opt(512, "Tokens per training sample (packed).", low=1)
    max_position_embeddings: Optional[int] = opt(
        None, "Longest position the rotary tables cover; default: --seq-length; not below it.", low=1)
    vocab_size: int = opt(1000, "True vocabulary size (before padding for tensor parallelism).", low=1)
    make_vocab_size_divisible_by: int = opt(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size; padded "
        "entries are never predicted.", low=1)
    rotary_base: float = opt(10000.0, "RoPE base (theta).", above=0)
    rope_scaling_type: Optional[str] = opt(
        None, "RoPE frequency scaling: none, or 'llama3' (LLaMA-3.1 style).", choices=[None, "llama3"])
    rope_scaling_factor: float = opt(8.0, "llama3 RoPE scaling: factor.", above=0)
    rope_low_freq_factor: float = opt(1.0, "llama3 RoPE scaling: low-frequency factor.", above=0)
    rope_high_freq_factor: float = opt(4.0, "llama3 RoPE scaling: high-frequency factor.", above=0)
    rope_original_max_position_embeddings: int = opt(
        8192, "llama3 RoPE scaling: context length the base model was trained at.", low=1)
    norm_epsilon: float = opt(1e-5, "RMSNorm epsilon (added inside the rsqrt, as in HF LLaMA).", above=0)
    untie_embeddings_and_output_weights: bool = opt(
        True, "Separate input embedding and LM head weights (LLaMA); --no-... ties them.")
    attention_dropout: float = opt(0.0, "Dropout on attention probabilities.", low=0, below=1)
    hidden_dropout: float = opt(0.0, "Dropout on attention and MLP outputs before the residual add.", low=0, below=1)
    init_method_std: float = opt(0.02, "Std of the normal initialisation of weights.", low=0)
    visual_embed_dim: int = opt(
        64, "d: width of the stored visual embeddings (the image tokenizer's output); the visual "
        "projection maps d -> hidden and the regression head hidden -> d.", low=1)
    fused_kernels: str = opt(
        "auto", "Kernel choice per op (attention, RMSNorm, RoPE, SwiGLU, CE): 'auto' (fused on CUDA when "
        "importable, torch otherwise), 'torch' (always the torch reference) or 'require' (the fused "
        "kernels or an error at start naming the missing one). The run logs once which ran.",
        choices=["auto", "torch", "require"])

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class DataParallelConfig:
    """Data parallelism only (models small enough for every rank, e.g. the image tokenizer)."""
    zero_stage: int = opt(1, "DeepSpeed ZeRO stage 0-3. Stages 2 and 3 cannot be combined with "
                          "pipeline parallelism.", choices=[0, 1, 2, 3])
    distributed_backend: str = opt(
        "auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.",
        choices=["auto", "nccl", "gloo"])
    distributed_timeout_minutes: int = opt(
        10, "Timeout of the process group's collectives (Megatron's flag): a rank that waits longer for the "
        "others fails instead of hanging.", low=1)

    def model_parallel(self):
        """(tensor-parallel size, pipeline stages)."""
        return 1, 1


@dataclass
class ParallelConfig(DataParallelConfig):
    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size (ranks that split each layer).", low=1)
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size (stages).", low=1)

    def model_parallel(self):
        return self.tensor_model_parallel_size, self.pipeline_model_parallel_size


@dataclass
class DataConfig:
    data_path: List[str] = opt(
        help="Dataset prefixes, optionally weighted: '0.5 mmc4 0.3 obelics 0.2 pairs'.",
        factory=list)
    split: str = opt("98,2,0", "Train/validation/test split weights: up to three non-negative numbers with a "
                     "positive sum, e.g. 98,2,0 (or 98/2/0).")
    data_cache_path: Optional[str] = opt(None, "Where sample-order index files are cached; "
                                         "default: beside the data.")
    tokenizer_type: str = opt("sentencepiece", "Tokenizer kind.", choices=["sentencepiece", "hf"])
    tokenizer_model: Optional[str] = opt(None, "Sentencepiece .model file or HF tokenizer directory.")
    reset_attention_mask: bool = opt(
        True, "Keep attention inside each document of a packed sample (document isolation), and give no "
        "loss to a target in the next document. On by default: VL-GPT trains on one subsequence per "
        "document, and packed interleaved data would otherwise attend across unrelated documents' "
        "images. --no-reset-attention-mask is Megatron's plain causal packing.")
    eod_mask_loss: bool = opt(
        False, "No loss on the target of an end-of-document token (Megatron's --eod-mask-loss): the "
        "first token of the next packed document is not predicted from the previous one.")
    reset_position_ids: bool = opt(False, "Restart position ids at each document boundary.")
    num_image_tokens: int = opt(32, "N: visual embeddings per image (must match the feature store).", low=1)
    max_images_per_sample: int = opt(5, "Most image blocks in one packed sample.", low=1)
    num_workers: int = opt(2, "Data loader worker processes.", low=0)
    pack: bool = opt(True, "Pack several documents (conversations) into each sample; --no-pack starts every "
                     "document in a sample of its own, padded. Instruction data never splits a conversation "
                     "across samples: one longer than --seq-length is truncated, and the run counts them at start.")


@dataclass
class OptimizerConfig:
    lr: float = opt(2e-4, "Peak learning rate.", low=0)
    min_lr: float = opt(0.0, "Learning rate at the end of the decay.", low=0)
    lr_decay_style: str = opt("cosine", "Decay after warmup.", choices=["cosine", "linear", "constant"])
    lr_warmup_iters: int = opt(0, "Linear warmup iterations.", low=0)
    lr_decay_iters: Optional[int] = opt(None, "Iterations over which lr decays; default: --train-iters.", low=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (never applied to norms and biases).", low=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", low=0, below=1)
    adam_beta2: float = opt(0.95, "AdamW beta2.", low=0, below=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon.", above=0)
    clip_grad: float = opt(1.0, "Global gradient-norm clip; 0 turns clipping off.", low=0)


@dataclass
class LoopConfig:
    """The training loop's settings, shared by every stage."""
    micro_batch_size: int = opt(1, "Samples per rank per forward/backward.", low=1)
    global_batch_size: Optional[int] = opt(
        None, "Samples per optimizer step across all data-parallel ranks; must equal "
        "micro batch x accumulation steps x data-parallel size. Default: micro x dp.", low=1)
    train_iters: int = opt(100, "Optimizer steps to train.", low=0)
    bf16: bool = opt(False, "Train in bfloat16 mixed precision.")
    fp16: bool = opt(False, "Train in float16 with dynamic loss scaling.")
    seed: int = opt(1234, "Random seed.", low=0)
    max_skipped_steps: int = opt(
        10, "Abort after this many consecutive updates skipped for a non-finite loss or gradient norm.", low=0)
    exit_interval: Optional[int] = opt(
        None, "Exit (after saving, with --save) once the iteration is a multiple of this.", low=1)
    eval_interval: int = opt(1000, "Iterations between held-out evaluations (stages that have one).", low=1)
    eval_iters: int = opt(10, "Batches per evaluation.", low=0)
    deepspeed_config: Optional[str] = opt(
        None, "A DeepSpeed JSON to merge into the derived one; conflicting values are an error.",
        flag="--deepspeed_config")


@dataclass
class TrainingConfig(LoopConfig):
    recompute_activations: bool = opt(False, "Recompute each layer's activations in backward.")
    visual_loss_weight: float = opt(1.0, "Weight of the visual MSE loss beside the text cross-entropy.", low=0)
    eval_tasks: List[str] = opt(
        help="Benchmarks run on the training model at each --eval-interval and logged beside the losses "
        "(coco_caption vqav2 okvqa vizwiz gqa; tools/evaluate.py's tasks).", factory=list)
    eval_tasks_config: Optional[str] = opt(
        None, "JSON {task: {questions, annotations, train_questions, train_annotations, image_root, "
        "image_pattern}} naming each --eval-tasks task's local files.")
    eval_image_tokenizer: Optional[str] = opt(
        None, "The image tokenizer directory that made the data's features (it tokenizes the tasks' images).")
    eval_max_items: int = opt(50, "Items per --eval-tasks task (the first ones of its file).", low=1)
    eval_shots: List[int] = opt(help="Shot counts of the --eval-tasks prompts.", factory=lambda: [0], low=0)


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "Directory to save checkpoints to.")
    load: Optional[str] = opt(None, "Directory to load a checkpoint from.")
    save_interval: Optional[int] = opt(None, "Iterations between checkpoints.", low=1)
    keep_last: Optional[int] = opt(None, "Keep only this many newest checkpoints.", low=1)
    ckpt_step: Optional[int] = opt(None, "Load the checkpoint of this iteration instead of the one "
                                   "'latest' names.", low=0)
    finetune: bool = opt(
        False, "Megatron's --finetune: take only the weights of the --load training checkpoint (its LoRA "
        "adapters and [IMG]/[/IMG] row deltas merged into the base weights), start at iteration 0 with a fresh "
        "optimizer, schedule and data position. Same architecture; the layout (TP, PP, DP, ZeRO) may differ. "
        "Once --save holds a checkpoint, a restart resumes from it instead.")


@dataclass
class LoggingConfig:
    log_interval: int = opt(10, "Iterations between console log lines.", low=1)
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event directory.")
    wandb_project: Optional[str] = opt(None, "Weights & Biases project (when wandb is installed).")
    peak_tflops: Optional[float] = opt(
        None, "Peak dense TFLOP/s of one device for MFU; default: looked up from the GPU name "
        "(A100/H100/H200 bf16), none on CPU.", above=0)


@dataclass
class LoraConfig:
    lora_rank: int = opt(0, "LoRA rank; 0 trains the full model.", low=0)
    lora_alpha: float = opt(32.0, "LoRA alpha (scale = alpha / rank).", low=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.", low=0, below=1)
    lora_target_modules: List[str] = opt(
        help="Projections that get LoRA adapters.",
        factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])


class Sections:
    """What every entry point's top-level config (a dataclass of section dataclasses) shares."""

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Dict[str, Any]], source: str = "<dict>"):
        cfg = cls()
        apply_nested(cfg, data, source)
        return cfg


@dataclass
class Config(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, world_size: int) -> None:
        validate(self, world_size)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _section_types(config_cls=Config):
    """{section name: its dataclass} of a top-level config (Config, or another entry point's)."""
    hints = get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _base_type(tp):
    """Optional[X] -> X; List[X] stays a list type."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _coerce(value: Any, tp, where: str):
    base = _base_type(tp)
    if value is None:
        return None
    if get_origin(base) in (list, List):
        if isinstance(value, str):
            value = value.split()
        item = get_args(base)[0]
        return [_coerce(v, item, where) for v in value]
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
    sections = list(_section_types(type(cfg)))
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
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def build_parser(description: str = "", parser: Optional[argparse.ArgumentParser] = None,
                 config_cls=Config) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, grouped by section. Defaults are
    suppressed so that only flags the user typed override the YAML file."""
    parser = parser or argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with {section: {field: value}}; flags override it.")
    # The deepspeed launcher appends --local_rank=N; accept and ignore it (env LOCAL_RANK wins).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for section, section_type in _section_types(config_cls).items():
        group = parser.add_argument_group(section)
        hints = get_type_hints(section_type)
        defaults = section_type()
        for f in dataclasses.fields(section_type):
            tp = _base_type(hints[f.name])
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


def load_config(argv: Optional[Sequence[str]] = None, description: str = "",
                parser: Optional[argparse.ArgumentParser] = None, config_cls=Config):
    """Parses flags (and the YAML they name) into a config_cls. Returns (config, namespace)
    so an entry script can read its own extra flags from the namespace."""
    parser = parser or build_parser(description, config_cls=config_cls)
    ns = parser.parse_args(argv)
    cfg = config_cls()
    if ns.config:
        with open(ns.config) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{ns.config}: not valid YAML: {exc}") from None
        apply_nested(cfg, data, ns.config)
    overrides: Dict[str, Dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    apply_nested(cfg, overrides, "command line")
    return cfg, ns


def save_yaml(cfg, path: str) -> None:
    with atomic_open(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def data_parallel_size(cfg, world_size: int) -> int:
    tp, pp = cfg.parallel.model_parallel()
    return world_size // (tp * pp)


def gradient_accumulation_steps(cfg, world_size: int) -> int:
    t = cfg.training
    dp = data_parallel_size(cfg, world_size)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    return gbs // (t.micro_batch_size * dp)


def effective_zero_stage(cfg) -> int:
    """The ZeRO stage a run uses: pipelines run ZeRO-1 even when 0 is asked for (DeepSpeed's
    pipeline engine computes the clip norm wrongly at ZeRO-0 and fails to load bf16
    checkpoints there)."""
    p = cfg.parallel
    return 1 if p.model_parallel()[1] > 1 and p.zero_stage == 0 else p.zero_stage


def _range_text(meta) -> str:
    low, above, below = meta.get("low"), meta.get("above"), meta.get("below")
    parts = ([f">= {low:g}"] if low is not None else []) + ([f"> {above:g}"] if above is not None else []) + \
        ([f"< {below:g}"] if below is not None else [])
    return " and ".join(parts)


def range_errors(cfg) -> List[str]:
    """Every declared field range (opt's low/above/below) a value of cfg falls outside: one
    line per flag, e.g. '--micro-batch-size 0: must be >= 1'. Any entry point's config."""
    errors = []
    for section in _section_types(type(cfg)):
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
                    errors.append(f"{flag_name(f)} {v!r}: must be {_range_text(meta)}")
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


def _path_errors(cfg) -> List[str]:
    """Output/input directories that name something else (a file where a directory must be)."""
    import os
    errors = []
    for flag, path in (("--save", cfg.checkpoint.save), ("--load", cfg.checkpoint.load),
                       ("--tensorboard-dir", cfg.logging.tensorboard_dir),
                       ("--data-cache-path", getattr(cfg.data, "data_cache_path", None))):
        if path and os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"{flag} {path}: is a file, not a directory")
    return errors


def validate(cfg: Config, world_size: int, extra_checks: Sequence[Callable[[Config], List[str]]] = ()) -> None:
    """Refuses settings that cannot run, before any process-group work is done. `extra_checks`
    are the rules of other parts (the evaluation tasks), reported in the same list."""
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
    errors += _path_errors(cfg)
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
                      f"x --pipeline-model-parallel-size ({pp})")
    if m.hidden_size % m.num_attention_heads:
        errors.append(f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
                      f"({m.num_attention_heads})")
    if m.num_attention_heads % tp:
        errors.append(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    if m.kv_heads % tp:
        errors.append(f"--num-query-groups ({m.kv_heads}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    if m.num_attention_heads % m.kv_heads:
        errors.append(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
                      f"--num-query-groups ({m.kv_heads})")
    if m.ffn_hidden_size % tp:
        errors.append(f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by "
                      f"--tensor-model-parallel-size ({tp})")
    if m.num_layers % pp:
        errors.append(f"--num-layers ({m.num_layers}) must be divisible by "
                      f"--pipeline-model-parallel-size ({pp})")
    if p.zero_stage >= 2 and pp > 1:
        errors.append(f"--zero-stage {p.zero_stage} with --pipeline-model-parallel-size {pp}: DeepSpeed "
                      "cannot combine ZeRO-2/3 with pipeline parallelism (it partitions gradients that "
                      "the pipeline engine accumulates across micro-batches). Use --zero-stage 1 with "
                      "pipelines, or --pipeline-model-parallel-size 1 with ZeRO-3.")
    if m.rope_scaling_type not in (None, "llama3"):
        errors.append(f"--rope-scaling-type {m.rope_scaling_type!r}: expected none or llama3")
    if not errors and tp * pp <= world_size:
        errors += training_errors(cfg, world_size)
    for check in extra_checks:
        errors += check(cfg)
    raise_errors(errors)


def training_errors(cfg, world_size: int) -> List[str]:
    """What any entry point's training/batch settings get wrong (precision, batch split)."""
    t = cfg.training
    errors = range_errors(cfg)
    if errors:   # (the batch arithmetic below divides by these)
        return errors
    if getattr(cfg, "checkpoint", None) is not None and not isinstance(cfg, Config):
        errors += _path_errors(cfg)   # (Config.validate checks them itself)
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

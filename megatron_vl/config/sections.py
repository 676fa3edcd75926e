"""The settings of pretraining and instruction tuning, as typed section dataclasses: each
field declared once with its help text (``opt``), from which the flag (Megatron's name:
``num_layers`` -> ``--num-layers``), the YAML key (``section.field``) and the DeepSpeed JSON
entries are derived (cli.py, deepspeed_json.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .checks import validate
from .fields import apply_nested, opt
from .presets import PRESET_DIR as EXAMPLE_PRESETS


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

    @property
    def precision(self) -> str:
        """The training precision's name: 'bf16', 'fp16' or 'fp32'."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def torch_dtype(self):
        """The torch dtype of the training precision (torch imported here: config is read
        by tools that never load it)."""
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]


@dataclass
class TrainingConfig(LoopConfig):
    recompute_activations: bool = opt(False, "Recompute each layer's activations in backward.")
    visual_loss_weight: float = opt(1.0, "Weight of the visual MSE loss beside the text cross-entropy.", low=0)
    eval_tasks: List[str] = opt(
        help="Benchmarks run on the training model at each --eval-interval and logged beside the losses "
        "(--eval-harness builtin: coco_caption vqav2 okvqa vizwiz gqa, tools/evaluate.py's tasks; "
        "--eval-harness lmms: lmms-eval task names).", factory=list)
    eval_harness: str = opt(
        "builtin", "Which harness runs --eval-tasks: 'builtin' (ours: the paper's benchmarks with their official "
        "metrics, files from --eval-tasks-config) or 'lmms' (lmms-eval tasks, from --eval-lmms-include-path or "
        "lmms-eval's own tasks whose data is in the local Hugging Face cache; needs pip install -e .[lmms]).",
        choices=["builtin", "lmms"])
    eval_lmms_include_path: Optional[str] = opt(
        None, "--eval-harness lmms: a directory of lmms-eval task YAMLs (lmms-eval's --include_path); lmms-eval's "
        "built-in tasks are looked at only for names not found there.")
    eval_tasks_config: Optional[str] = opt(
        None, "JSON {task: {questions, annotations, train_questions, train_annotations, image_root, "
        "image_pattern}} naming each --eval-tasks task's local files.")
    eval_image_tokenizer: Optional[str] = opt(
        None, "The image tokenizer directory that made the data's features (it tokenizes the tasks' images).")
    eval_max_items: int = opt(50, "Items per --eval-tasks task (the first ones of its file; lmms-eval's limit).",
                              low=1)
    eval_shots: List[int] = opt(help="Shot counts of the --eval-tasks prompts (builtin harness; an lmms-eval task "
                                "sets its own num_fewshot).", factory=lambda: [0], low=0)


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

    # Where --model-preset finds its named presets (YAML files in this config's layout);
    # None: the entry point offers no --model-preset.
    PRESET_DIR = None

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

    PRESET_DIR = EXAMPLE_PRESETS

    def validate(self, world_size: int) -> None:
        validate(self, world_size)


SECTIONS = [f.name for f in dataclasses.fields(Config)]

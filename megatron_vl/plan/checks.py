"""What the planner refuses before it plans: numbers out of range, a cluster that cannot be
split into nodes, and layout flags (TP, PP, ZeRO, micro-batch, recompute) that no run could use.

A layout flag the user typed is a constraint the search honours (planner.layouts); when it
cannot work, the planner says why instead of planning something else. Each function returns
plain-English reasons naming the flag; the tool raises them together as one UsageError.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from .model import Cluster

# Where the user's layout choice comes from: the config's (section.field) -> the Layout field.
LAYOUT_FIELDS = {"parallel.tensor_model_parallel_size": "tp", "parallel.pipeline_model_parallel_size": "pp",
                 "parallel.zero_stage": "zero", "training.micro_batch_size": "micro",
                 "training.recompute_activations": "recompute"}
FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size", "zero": "--zero-stage",
         "micro": "--micro-batch-size", "recompute": "--recompute-activations"}


def given_layout(cfg, given: set, ds_config: dict) -> Dict[str, object]:
    """The layout choices the user made (flags or YAML keys in `given`, as section.field), plus
    the ZeRO stage and micro-batch of their DeepSpeed JSON: {tp, pp, zero, micro, recompute}
    subset. A JSON value that disagrees with a flag is refused (training would refuse it too)."""
    fixed: Dict[str, object] = {}
    for dotted, key in LAYOUT_FIELDS.items():
        if dotted in given:
            section, name = dotted.split(".")
            fixed[key] = getattr(getattr(cfg, section), name)
    source = cfg.training.deepspeed_config
    for key, value in (("zero", (ds_config.get("zero_optimization") or {}).get("stage")),
                       ("micro", ds_config.get("train_micro_batch_size_per_gpu"))):
        if not isinstance(value, int) or isinstance(value, bool):
            continue   # absent or "auto": the search decides
        if key in fixed and fixed[key] != value:
            raise_usage([f"{FLAGS[key]} {fixed[key]} disagrees with --deepspeed_config {source} "
                         f"({'zero_optimization.stage' if key == 'zero' else 'train_micro_batch_size_per_gpu'} = "
                         f"{value})"])
        fixed[key] = value
    return fixed


def _positive(value, finite=True) -> bool:
    return isinstance(value, (int, float)) and value > 0 and (not finite or math.isfinite(value))


def cluster_errors(cluster: Cluster, top: int) -> List[str]:
    """Ranges of the cluster flags (a zero or negative count, an efficiency outside (0, 1]),
    and GPUs that do not fill whole nodes."""
    errors = []
    for value, flag in ((cluster.gpus, "--gpus"), (cluster.gpus_per_node, "--gpus-per-node"), (top, "--top")):
        if value < 1:
            errors.append(f"{flag} {value}: must be at least 1")
    for value, flag in ((cluster.memory_gib, "--gpu-memory-gib"), (cluster.peak_tflops, "--peak-tflops"),
                        (cluster.intra_node_gbps, "--intra-node-gbps"),
                        (cluster.inter_node_gbps, "--inter-node-gbps")):
        if not _positive(value):
            errors.append(f"{flag} {value:g}: must be a number above 0")
    if not (0 < cluster.kernel_efficiency <= 1):   # (NaN fails this too)
        errors.append(f"--kernel-efficiency {cluster.kernel_efficiency:g}: must be a fraction of peak in (0, 1], "
                      "e.g. 0.4 for a measured MFU of 40%")
    if not (cluster.reserved_gib >= 0 and math.isfinite(cluster.reserved_gib)):
        errors.append(f"--reserved-gib {cluster.reserved_gib:g}: must be 0 or more")
    elif _positive(cluster.memory_gib) and cluster.reserved_gib >= cluster.memory_gib:
        errors.append(f"--reserved-gib {cluster.reserved_gib:g} leaves nothing of the {cluster.memory_gib:g} GiB "
                      "per GPU for training")
    if cluster.gpus > cluster.gpus_per_node >= 1 and cluster.gpus % cluster.gpus_per_node:
        errors.append(f"--gpus {cluster.gpus} is not a whole number of nodes of --gpus-per-node "
                      f"{cluster.gpus_per_node}; give a multiple of it (or fewer GPUs than one node)")
    return errors


def model_errors(cfg, global_batch: Optional[int]) -> List[str]:
    """Model and batch sizes the planner cannot count: zero or negative sizes, heads that do not
    split the hidden size, query groups that do not split the heads."""
    m, t = cfg.model, cfg.training
    errors = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                 "make_vocab_size_divisible_by", "visual_embed_dim"):
        value = getattr(m, name)
        if value < 1:
            errors.append(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if m.num_query_groups is not None and m.num_query_groups < 1:
        errors.append(f"--num-query-groups {m.num_query_groups}: must be at least 1")
    if m.max_position_embeddings is not None and m.max_position_embeddings < 1:
        errors.append(f"--max-position-embeddings {m.max_position_embeddings}: must be at least 1")
    if cfg.lora.lora_rank < 0:
        errors.append(f"--lora-rank {cfg.lora.lora_rank}: must be 0 (full training) or more")
    if t.micro_batch_size < 1:
        errors.append(f"--micro-batch-size {t.micro_batch_size}: must be at least 1")
    if global_batch is not None and global_batch < 1:
        errors.append(f"--global-batch-size {global_batch}: must be at least 1")
    if t.bf16 and t.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")
    if errors:
        return errors
    if m.hidden_size % m.num_attention_heads:
        errors.append(f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
                      f"({m.num_attention_heads})")
    if m.num_attention_heads % m.kv_heads:
        errors.append(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --num-query-groups "
                      f"({m.kv_heads})")
    return errors


def layout_errors(cfg, cluster: Cluster, global_batch: int, fixed: Dict[str, object]) -> List[str]:
    """Why the layout choices in `fixed` cannot run on this cluster and model (the same rules
    the training's configuration check applies, with the planner's GPU count as the world)."""
    m, gpus = cfg.model, cluster.gpus
    errors = []
    tp, pp = fixed.get("tp"), fixed.get("pp")
    for key, value in (("tp", tp), ("pp", pp), ("micro", fixed.get("micro"))):
        if value is not None and value < 1:
            errors.append(f"{FLAGS[key]} {value}: must be at least 1")
    if errors:
        return errors
    if tp is not None:
        for what, n in ((f"--gpus ({gpus})", gpus), (f"--num-attention-heads ({m.num_attention_heads})",
                                                    m.num_attention_heads),
                        (f"--num-query-groups ({m.kv_heads})", m.kv_heads),
                        (f"--ffn-hidden-size ({m.ffn_hidden_size})", m.ffn_hidden_size)):
            if n % tp:
                errors.append(f"{what} is not divisible by --tensor-model-parallel-size ({tp})")
    if pp is not None:
        if m.num_layers % pp:
            errors.append(f"--num-layers ({m.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
        if gpus % ((tp or 1) * pp):
            errors.append(f"--gpus ({gpus}) is not divisible by "
                          + (f"--tensor-model-parallel-size ({tp}) x " if tp else "")
                          + f"--pipeline-model-parallel-size ({pp})")
    zero = fixed.get("zero")
    if zero is not None and zero >= 2 and (pp or 1) > 1:
        errors.append(f"--zero-stage {zero} with --pipeline-model-parallel-size {pp}: DeepSpeed cannot combine "
                      "ZeRO-2/3 with pipeline parallelism")
    micro = fixed.get("micro")
    if micro is not None and global_batch % micro:
        errors.append(f"--global-batch-size ({global_batch}) is not a multiple of --micro-batch-size ({micro})")
    return errors


def raise_usage(errors: List[str]) -> None:
    from ..errors import UsageError
    if errors:
        raise UsageError(errors[0] if len(errors) == 1 else
                         "cannot plan:\n  - " + "\n  - ".join(errors))


def describe(fixed: Dict[str, object]) -> str:
    """The layout choices as the flags that make them: `--tensor-model-parallel-size 2, ...`."""
    return ", ".join((FLAGS[k] if v else "--no-" + FLAGS[k][2:]) if isinstance(v, bool) else f"{FLAGS[k]} {v}"
                     for k, v in fixed.items())


def no_layout_message(cfg, cluster: Cluster, global_batch: int, fixed: Dict[str, object]) -> str:
    """Why the search found nothing, when each choice passed layout_errors on its own."""
    m = cfg.model
    chosen = describe(fixed)
    return (f"no layout: {cluster.gpus} GPUs ({cluster.gpus_per_node} per node) cannot split {m.num_layers} layers / "
            f"{m.num_attention_heads} heads ({m.kv_heads} query groups, FFN {m.ffn_hidden_size}) / global batch "
            f"{global_batch}" + (f" with {chosen}" if chosen else "")
            + ": tensor parallelism must divide the heads, the query groups and the FFN within a node, pipeline "
            "stages the layers, and micro-batch x data-parallel size the global batch")

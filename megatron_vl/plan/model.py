"""Per-rank memory and step time of one layout.

Memory (bytes, the busiest rank) is the larger of two moments of a step, each a sum of what
is alive then (T: the rank's trainable elements, its TP/PP slice; part: its ZeRO partition,
T / dp; d: bytes of the training dtype):
- forward/backward: weights (counts.py), the optimizer's fp32 master copy of the partition
  (ZeRO >= 1 keeps one even in fp32) and Adam's two moments, gradients (ZeRO-0/1: param.grad of
  all of T; ZeRO-2/3: the partition), activations (what backward keeps, measured on the real
  layer on the meta device: activations.py; times the micro-batches in flight, 1F1B: pp on
  stage 0; plus the LM head's loss, which computes its gradients in forward and keeps them),
  buffers (DeepSpeed's gradient bucket, reduce_bucket_size elements whatever the model size,
  one more with overlap_comm and one more under pipeline parallelism; ZeRO-3's gathered
  parameters, the whole stage or, when stage3_max_live_parameters is smaller, that plus the
  largest tensor (an estimate), times the copies the backend makes);
- optimizer step: weights, master, moments, the gradient partition and the flattened fp32
  copy DeepSpeed hands the optimizer, and torch AdamW's temporaries (Runtime).
DeepSpeed's settings come from the run's DeepSpeed JSON through DeepSpeed's own config class
(its defaults when absent). Checked against the allocator's peak of real CPU runs
(measure.py, tests/test_plan_memory.py); the GPU paths (Runtime GPU) are modelled, not checked.

Step time: FLOPs per token by flops.py (6 x trainable + 4 x frozen matmul weights, causal
attention 6 x L x s x a; recomputation adds a forward, which MFU does not count) at an assumed
fraction of peak, the pipeline bubble (pp - 1) / micro-batches, and the collectives per step
(tensor-parallel all-reduces inside a node, data-parallel gradient reduction and ZeRO-3's
parameter gathers across nodes) over the stated link bandwidths; half of the data-parallel
traffic is assumed hidden behind backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from .flops import attention_shape, training_flops, weights_from_counts

GiB = 1024 ** 3


@dataclass(frozen=True)
class Cluster:
    gpus: int
    memory_gib: float
    gpus_per_node: int = 8
    peak_tflops: float = 312.0
    """Dense bf16 peak per GPU."""
    intra_node_gbps: float = 300.0
    """GB/s per GPU inside a node (NVLink), as all-reduce bus bandwidth."""
    inter_node_gbps: float = 25.0
    """GB/s per GPU across nodes (InfiniBand 200 Gb/s per GPU = 25 GB/s)."""
    kernel_efficiency: float = 0.5
    """Fraction of peak the kernels reach (a measured MFU of a single GPU is the best value)."""
    reserved_gib: float = 3.0
    """Left for the CUDA context, allocator fragmentation and NCCL (not modelled)."""


PRESETS: Dict[str, Cluster] = {
    "A100-40GB": Cluster(gpus=8, memory_gib=40, peak_tflops=312, intra_node_gbps=300, inter_node_gbps=25),
    "A100-80GB": Cluster(gpus=8, memory_gib=80, peak_tflops=312, intra_node_gbps=300, inter_node_gbps=25),
    "H100-80GB": Cluster(gpus=8, memory_gib=80, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50),
}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    recompute: bool


@dataclass
class Estimate:
    layout: Layout
    memory: Dict[str, float] = field(default_factory=dict)
    """Bytes by part at the peak: weights, gradients, optimizer, activations, buffers; and
    "phase": the moment of the peak (forward/backward or step)."""
    step_seconds: float = 0.0
    mfu: float = 0.0
    fits: bool = False

    @property
    def total(self) -> float:
        return total_bytes(self.memory)


@dataclass(frozen=True)
class Runtime:
    """Code paths that differ between a GPU run and a CPU (gloo) run of the same layout."""
    adam_temporaries: int = 1
    """Partition-sized temporaries of torch's AdamW step: 1 on its foreach path (CUDA), 2 on the
    single-tensor path (CPU: the square root and the division are alive together)."""
    gather_copies: int = 1
    """Copies of a ZeRO-3 gathered parameter: 1 with NCCL (gathered in place), 2 with gloo
    (gathered, then concatenated; both kept until released)."""


GPU = Runtime()
CPU_GLOO = Runtime(adam_temporaries=2, gather_copies=2)


@dataclass(frozen=True)
class ZeroSettings:
    """DeepSpeed's buffer settings (elements) that the memory depends on."""
    reduce_bucket_size: int
    contiguous_gradients: bool
    overlap_comm: bool
    max_live_parameters: int
    param_persistence_threshold: int

    @classmethod
    def from_deepspeed(cls, ds_config: dict, stage: int) -> "ZeroSettings":
        """From a DeepSpeed JSON's zero_optimization section at ZeRO stage `stage`, absent keys
        filled by DeepSpeed's own config class (its defaults depend on the stage)."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        z = DeepSpeedZeroConfig(**{**ds_config.get("zero_optimization", {}), "stage": stage})
        return cls(int(z.reduce_bucket_size), bool(z.contiguous_gradients), bool(z.overlap_comm),
                   int(z.max_live_parameters), int(z.param_persistence_threshold))


def activation_bytes(cfg, layout: Layout, seq: int, layers: int, in_flight: int, last_stage: bool,
                     dtype_bytes: int) -> float:
    """What backward keeps on the rank: `in_flight` micro-batches through `layers` layers
    (with recompute: their inputs, plus one layer recomputed in full), and on the last stage
    the LM head (final norm; the chunked loss keeps the hidden-state gradient, and the weight
    gradient when the head trains, from forward to backward; one chunk of logits in flight)."""
    import torch
    from .activations import layer_saved_bytes
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    micro, h = layout.micro, cfg.model.hidden_size
    per_layer = layer_saved_bytes(cfg, layout.tp, micro, seq, dtype, layout.recompute)
    total = in_flight * layers * per_layer
    if layout.recompute:
        total += layer_saved_bytes(cfg, layout.tp, micro, seq, dtype, False)
    if last_stage:
        vocab = cfg.model.padded_vocab_size(layout.tp) // layout.tp
        head = 2 * seq * micro * h * dtype_bytes
        if cfg.lora.lora_rank == 0:
            head += vocab * h * dtype_bytes
        total += in_flight * head + min(1024, seq * micro) * vocab * 4
    return total


def memory(counts: dict, layout: Layout, cfg, seq: int, gas: int, dtype_bytes: int, zero: ZeroSettings,
           runtime: Runtime = GPU, last_stage: bool = True) -> Dict[str, float]:
    """Bytes per rank by part at the peak moment of a step (see the module doc), for one
    pipeline stage's counts (rank_parameters' entries); "phase" says which moment."""
    z, dp, d = layout.zero, layout.dp, dtype_bytes
    trainable = counts["trainable_slice"]
    part = trainable / dp if z else trainable
    weights = (counts["trainable"] + counts["frozen"]) * d
    optimizer = part * 8 + (part * 4 if (z or d != 4) else 0)
    layers = cfg.model.num_layers // layout.pp
    in_flight = min(layout.pp, gas) if layout.pp > 1 else 1
    activations = activation_bytes(cfg, layout, seq, layers, in_flight, last_stage, d)
    bucket = (zero.reduce_bucket_size * d * (2 if zero.overlap_comm and z < 3 else 1)
              if z and (zero.contiguous_gradients or z == 3) else 0)
    if z in (1, 2) and layout.pp > 1 and zero.contiguous_gradients:
        bucket += zero.reduce_bucket_size * d   # the pipeline's reduction adds one of its own
    if z == 3:
        stage = counts["trainable_slice"] + counts["frozen_slice"]
        # DeepSpeed prefetches while fewer than max_live_parameters are gathered and always
        # gathers the module in use: modelled as max_live + the largest tensor when max_live is
        # below the stage (an estimate: how far past max_live it goes depends on the module
        # order; within 2% in bench_plan_memory's runs), the whole stage otherwise (exact).
        live = zero.max_live_parameters + counts["largest"]
        gathered = runtime.gather_copies * min(stage, live) * d
        forward_backward = {"gradients": part * d, "buffers": bucket + gathered}
        step = {"gradients": part * d + part * 4, "buffers": bucket}
    elif z:
        forward_backward = {"gradients": trainable * d if z == 1 else part * d, "buffers": bucket}
        step = {"gradients": part * d + part * 4, "buffers": 0.0}
    else:
        forward_backward = {"gradients": trainable * d, "buffers": 0.0}
        step = {"gradients": trainable * d, "buffers": 0.0}
    adam = runtime.adam_temporaries * (part if z else counts["largest"]) * 4
    step["buffers"] += adam
    forward_backward.update(weights=weights, optimizer=optimizer, activations=activations, phase="forward/backward")
    step.update(weights=weights, optimizer=optimizer, activations=0.0, phase="step")
    return max(forward_backward, step, key=total_bytes)


def total_bytes(parts: Dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if k != "phase")


def step_time(stages: list, layout: Layout, model, cluster: Cluster, seq: int, global_batch: int,
              dtype_bytes: int) -> tuple:
    """(seconds per step, MFU) of a layout (see the module doc)."""
    tokens = global_batch * seq
    weights = weights_from_counts(sum(s["trainable_slice"] for s in stages) * layout.tp,
                                  sum(s["frozen_slice"] for s in stages) * layout.tp, model, layout.tp)
    shape = attention_shape(model, seq)
    flops = tokens * training_flops(weights, shape, layout.recompute)
    model_flops = tokens * training_flops(weights, shape)   # MFU: without the recomputation
    gpus = layout.tp * layout.pp * layout.dp
    compute = flops / (gpus * cluster.peak_tflops * 1e12 * cluster.kernel_efficiency)
    gas = global_batch // (layout.micro * layout.dp)
    compute *= 1 + (layout.pp - 1) / gas
    act = seq * layout.micro * model.hidden_size * dtype_bytes
    layers = model.num_layers // layout.pp
    tp_bw = (cluster.intra_node_gbps if layout.tp <= cluster.gpus_per_node else cluster.inter_node_gbps) * 1e9
    tp_comm = 0.0 if layout.tp == 1 else gas * layers * 4 * 2 * (layout.tp - 1) / layout.tp * act / tp_bw
    pp_comm = 0.0 if layout.pp == 1 else gas * 2 * act / (cluster.inter_node_gbps * 1e9)
    in_node = layout.tp * layout.dp <= cluster.gpus_per_node
    dp_bw = (cluster.intra_node_gbps if in_node else cluster.inter_node_gbps) * 1e9
    ring = 2 * (layout.dp - 1) / layout.dp
    stage_train = max(s["trainable_slice"] for s in stages)
    stage_all = max(s["trainable_slice"] + s["frozen_slice"] for s in stages)
    dp_bytes = ring * stage_train * dtype_bytes
    if layout.zero == 3:   # every micro-batch gathers the parameters in forward and again in backward
        dp_bytes += gas * 2 * (layout.dp - 1) / layout.dp * stage_all * dtype_bytes
    dp_comm = 0.0 if layout.dp == 1 else dp_bytes / dp_bw / 2
    seconds = compute + tp_comm + pp_comm + dp_comm
    mfu = model_flops / (seconds * gpus * cluster.peak_tflops * 1e12)
    return seconds, mfu

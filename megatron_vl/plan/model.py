"""Per-rank memory and step time of one layout.

Memory (bytes, the busiest rank: pipeline stage 0 holds the most micro-batches in flight):
- weights: the elements the rank holds (counts.py) x the training dtype;
- gradients: trainable elements x the dtype (ZeRO-0/1), plus DeepSpeed's fp32 partition of
  them (ZeRO >= 1; all ZeRO-2/3 keep);
- optimizer: Adam's two fp32 moments plus DeepSpeed's fp32 copy of the trainable partition
  (ZeRO >= 1 keeps one even in fp32; ZeRO-0 fp32 steps the parameters themselves);
- activations: what backward keeps per micro-batch (Korthikanti et al. 2022 for a LLaMA
  layer with a fused attention kernel: no s^2 score tensor), s*b*h*(10 + 24/t) 16-bit
  values a layer, or only the layer input with --recompute-activations (plus one layer's
  worth while it recomputes), times the micro-batches in flight (1F1B: pp on stage 0);
- buffers: DeepSpeed's gradient bucket and its reduced copy (up to reduce_bucket_size
  elements each), ZeRO-3's gathered parameters (up to stage3_max_live_parameters: they stay
  gathered while reused within stage3_max_reuse_distance), and the largest tensor whole.

Step time: FLOPs (6 x trainable + 4 x frozen per token: a frozen weight gets no weight
gradient; +2 x all with recompute; attention 6 x s x h per layer and token; MFU counts these
without the recomputation) at an assumed
fraction of peak, the pipeline bubble (pp - 1) / micro-batches, and the collectives per step
(tensor-parallel all-reduces inside a node, data-parallel gradient reduction and ZeRO-3's
parameter gathers across nodes) over the stated link bandwidths; half of the data-parallel
traffic is assumed hidden behind backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

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
    """Bytes by part: weights, gradients, optimizer, activations, buffers."""
    step_seconds: float = 0.0
    mfu: float = 0.0
    fits: bool = False

    @property
    def total(self) -> float:
        return sum(self.memory.values())


def activation_bytes(seq: int, micro: int, hidden: int, layers: int, tp: int, recompute: bool,
                     dtype_bytes: int) -> float:
    """What backward keeps for one micro-batch through `layers` layers (see the module doc)."""
    scale = dtype_bytes / 2
    full_layer = seq * micro * hidden * (10 + 24 / tp) * scale
    if recompute:
        return layers * seq * micro * hidden * dtype_bytes + full_layer
    return layers * full_layer


def memory(counts: dict, layout: Layout, model, seq: int, gas: int, dtype_bytes: int,
           reduce_bucket: int = 500_000_000, max_live: int = 1_000_000_000) -> Dict[str, float]:
    """Bytes per rank by part, for one pipeline stage's counts (rank_parameters' entries).
    reduce_bucket, max_live: DeepSpeed's reduce_bucket_size and stage3_max_live_parameters
    (their defaults; ZeRO-3 also keeps parameters gathered up to stage3_max_reuse_distance,
    1e9 by default, so a stage below 1e9 elements stays whole through forward and backward)."""
    z, dp = layout.zero, layout.dp
    held = counts["trainable"] + counts["frozen"]
    trainable_slice = counts["trainable_slice"]
    part = trainable_slice / dp   # a rank's share of the trainable elements under ZeRO >= 1
    # Gradients: param.grad of the whole slice (ZeRO-0/1), plus DeepSpeed's fp32 partition of
    # them (ZeRO >= 1); ZeRO-2/3 keep only the partition (their bucket is a buffer below).
    if z == 0:
        grads = trainable_slice * dtype_bytes
    elif z == 1:
        grads = trainable_slice * dtype_bytes + part * 4
    else:
        grads = part * 4
    # Adam's two fp32 moments, and DeepSpeed's fp32 copy of the partition (ZeRO >= 1 keeps one
    # even in fp32 training; ZeRO-0 in fp32 steps the parameters themselves).
    if z == 0:
        optimizer = trainable_slice * (8 + (0 if dtype_bytes == 4 else 4))
    else:
        optimizer = part * 12
    layers = model.num_layers // layout.pp
    in_flight = min(layout.pp, gas) if layout.pp > 1 else 1
    activations = in_flight * activation_bytes(seq, layout.micro, model.hidden_size, layers, layout.tp,
                                               layout.recompute, dtype_bytes)
    # Buffers: the gradient bucket of ZeRO-2/3 (up to reduce_bucket_size elements), ZeRO-3's
    # gathered parameters (a layer in use plus the prefetch bucket), the largest tensor whole.
    buffers = counts["largest"] * dtype_bytes
    # ZeRO-0/1 flatten the gradients into a bucket for the all-reduce; ZeRO-2/3 fill a
    # contiguous bucket: either way reduced out of place, so two of them.
    buffers += 2 * min(reduce_bucket, trainable_slice) * dtype_bytes
    if z == 3:   # parameters stay gathered while within max_reuse_distance / max_live_parameters
        stage = counts["trainable_slice"] + counts["frozen_slice"]
        buffers += min(max_live, stage) * dtype_bytes
    return {"weights": held * dtype_bytes, "gradients": grads, "optimizer": optimizer,
            "activations": activations, "buffers": buffers}


def step_time(stages: list, layout: Layout, model, cluster: Cluster, seq: int, global_batch: int,
              dtype_bytes: int) -> tuple:
    """(seconds per step, MFU) of a layout (see the module doc)."""
    tokens = global_batch * seq
    trainable = sum(s["trainable_slice"] for s in stages) * layout.tp
    frozen = sum(s["frozen_slice"] for s in stages) * layout.tp
    attention = 6 * seq * model.hidden_size * model.num_layers   # per token, forward + backward
    flops = tokens * (6 * trainable + 4 * frozen + attention + (2 * (trainable + frozen) if layout.recompute else 0))
    # MFU counts the work training needs (a frozen weight needs no weight gradient: 4, not 6,
    # FLOPs per token), not the recomputation.
    model_flops = tokens * (6 * trainable + 4 * frozen + attention)
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

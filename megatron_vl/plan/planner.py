"""Every layout a cluster allows for a model and batch, estimated and ranked (fits first,
then the fastest step)."""

from __future__ import annotations

from typing import Dict, List, Optional

from ..config import user_deepspeed_json
from .counts import rank_parameters
from .model import GPU, GiB, Cluster, Estimate, Layout, Runtime, ZeroSettings, memory, step_time, total_bytes

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg, cluster: Cluster, global_batch: int, fixed: Optional[Dict[str, object]] = None) -> List[Layout]:
    """TP within a node (dividing the heads, the query groups and the FFN), PP dividing the
    layers, DP the rest; ZeRO 1-3 (2 and 3 without pipelining: DeepSpeed refuses the pair);
    micro-batches dividing the per-rank batch; recompute off and on. A choice in `fixed`
    (checks.given_layout: what the user typed) is the only value searched for its part: a TP
    the user asks for may span nodes, a ZeRO-0 pipeline runs ZeRO-1 as training does."""
    m, fixed = cfg.model, fixed or {}
    out = []
    for tp in ([fixed["tp"]] if "tp" in fixed else _divisors(cluster.gpus)):
        if cluster.gpus % tp or m.num_attention_heads % tp or m.kv_heads % tp or m.ffn_hidden_size % tp:
            continue
        if "tp" not in fixed and tp > cluster.gpus_per_node:
            continue
        for pp in ([fixed["pp"]] if "pp" in fixed else _divisors(cluster.gpus // tp)):
            if m.num_layers % pp or cluster.gpus % (tp * pp):
                continue
            dp = cluster.gpus // (tp * pp)
            if "zero" in fixed:
                zeros = ((fixed["zero"],) if pp == 1 else (1,) if fixed["zero"] <= 1 else ())
            else:
                zeros = (1, 2, 3) if pp == 1 else (1,)
            for zero in zeros:
                for micro in ([fixed["micro"]] if "micro" in fixed else MICRO_BATCHES):
                    if global_batch % (micro * dp):
                        continue
                    for recompute in ([fixed["recompute"]] if "recompute" in fixed else (False, True)):
                        out.append(Layout(tp, pp, dp, zero, micro, bool(recompute)))
    return out


def _dtype_bytes(cfg) -> int:
    return 2 if (cfg.training.bf16 or cfg.training.fp16) else 4


def rank_memory(cfg, layout: Layout, global_batch: int, ds_config: dict, runtime: Runtime = GPU) -> dict:
    """The busiest rank's bytes by part (model.memory) for a layout of cfg's model."""
    zero = ZeroSettings.from_deepspeed(ds_config, layout.zero)
    stages = rank_parameters(cfg, layout.tp, layout.pp, layout.dp, layout.zero, zero.param_persistence_threshold)
    gas = global_batch // (layout.micro * layout.dp)
    # Stage 0 keeps the most micro-batches in flight; the last holds the head: the busiest rank.
    return max((memory(s, layout, cfg, cfg.model.seq_length, gas, _dtype_bytes(cfg), zero, runtime, s["last"])
                for s in stages), key=total_bytes)


def estimate(cfg, layout: Layout, cluster: Cluster, global_batch: int, ds_config: dict) -> Estimate:
    stages = rank_parameters(cfg, layout.tp, layout.pp, layout.dp, layout.zero)
    busiest = rank_memory(cfg, layout, global_batch, ds_config)
    seconds, mfu = step_time(stages, layout, cfg.model, cluster, cfg.model.seq_length, global_batch,
                             _dtype_bytes(cfg))
    est = Estimate(layout, busiest, seconds, mfu)
    est.fits = est.total <= (cluster.memory_gib - cluster.reserved_gib) * GiB
    return est


def plan(cfg, cluster: Cluster, global_batch: int, fixed: Optional[Dict[str, object]] = None) -> List[Estimate]:
    ds_config = user_deepspeed_json(cfg)   # its ZeRO buffer settings change the memory
    estimates = [estimate(cfg, lay, cluster, global_batch, ds_config)
                 for lay in layouts(cfg, cluster, global_batch, fixed)]
    return sorted(estimates, key=lambda e: (not e.fits, e.step_seconds, e.total))


def table(estimates: List[Estimate], cluster: Cluster, limit: int = 20) -> str:
    head = (f"{'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'micro':>5} {'recomp':>6} | {'weights':>8} {'grads':>8} "
            f"{'optim':>8} {'activ':>8} {'buffers':>8} {'total':>8} GiB {'peak at':>7} | {'fits':>4} | {'step s':>7} "
            f"{'MFU':>5}")
    lines = [head, "-" * len(head)]
    for e in estimates[:limit]:
        lay, mem = e.layout, e.memory
        lines.append(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero:>4} {lay.micro:>5} "
                     f"{'yes' if lay.recompute else 'no':>6} | "
                     + " ".join(f"{mem[k] / GiB:8.2f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                              "buffers"))
                     + f" {e.total / GiB:8.2f}     {'step' if mem['phase'] == 'step' else 'f/b':>7} | "
                     f"{'yes' if e.fits else 'NO':>4} | {e.step_seconds:7.2f} "
                     f"{e.mfu * 100:4.1f}%")
    fitting = sum(e.fits for e in estimates)
    lines.append(f"{len(estimates)} layouts, {fitting} fit in {cluster.memory_gib:g} GiB less "
                 f"{cluster.reserved_gib:g} reserved; {cluster.gpus} GPUs, {cluster.gpus_per_node} per node, "
                 f"{cluster.peak_tflops:g} TFLOP/s peak at {cluster.kernel_efficiency:.0%} efficiency")
    return "\n".join(lines)

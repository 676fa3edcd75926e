"""Measured memory of a real (CPU, gloo) training run, to check the planner's memory model.

Each rank records its resident memory just before the model is built and its peak after a
few training steps; the difference is what the model, its gradients, the optimizer, the
activations and DeepSpeed's buffers took: what the planner predicts.
"""

from __future__ import annotations

import resource
from typing import Sequence


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_rank(rank: int, world: int, argv: Sequence[str]) -> dict:
    """One rank of a pretraining run (inside testing.distributed.run_distributed): bytes of
    peak resident memory above the resident memory before the model was built."""
    import megatron_vl.training.pretrain as pretrain_module
    before = {}
    build = pretrain_module.build_model

    def measured_build(*args, **kwargs):
        before["rss"], before["peak"] = rss_bytes(), peak_bytes()
        return build(*args, **kwargs)
    pretrain_module.build_model = measured_build
    trainer = pretrain_module.pretrain(list(argv))
    if trainer.exit_code:
        raise RuntimeError(f"training exited with {trainer.exit_code}")
    if peak_bytes() <= before["peak"]:
        raise RuntimeError("the run never exceeded the memory it had before the model: nothing measured")
    return {"measured": peak_bytes() - before["rss"]}


def predicted(argv: Sequence[str], world: int) -> dict:
    """The planner's bytes by part for the busiest rank of this run's layout (fp32 on CPU)."""
    from ..config import effective_zero_stage, load_config
    from .counts import rank_parameters
    from .model import Layout, memory
    cfg, _ = load_config(list(argv))
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world // (tp * pp)
    zero = effective_zero_stage(cfg)
    layout = Layout(tp, pp, dp, zero, t.micro_batch_size, t.recompute_activations)
    gas = (t.global_batch_size or t.micro_batch_size * dp) // (t.micro_batch_size * dp)
    dtype_bytes = 2 if (t.bf16 or t.fp16) else 4
    stages = rank_parameters(cfg, tp, pp, dp, zero)
    parts = [memory(s, layout, cfg.model, cfg.model.seq_length, gas, dtype_bytes) for s in stages]
    return max(parts, key=lambda x: sum(x.values()))

"""Measured memory of a real (CPU, gloo) training run, to check the planner's memory model.

The measure is the peak of bytes held in tensors by torch's CPU allocator (the CPU
counterpart of torch.cuda.max_memory_allocated): what the model, gradients, optimizer,
activations and DeepSpeed's buffers take, and what the planner predicts. Resident memory
(RSS) is no measure of it: Linux backs a large allocation only where it is written (DeepSpeed
allocates a 5e8-element gradient bucket and fills a few MB of it), malloc keeps freed
blocks, and the runtime's own pages vary by 10% between runs.

torch counts every CPU allocation and free, on every thread, once c10's flag
caffe2_report_cpu_memory_usage is set (a free on a communication thread of a tensor
allocated on the main thread included); the profiler reports that running total with each
allocation of the main thread, and the peak is the largest less the total at the start.
The flag stays set for the rest of the process: turned off, frees would go uncounted and
later totals would carry tensors long gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import tempfile
from typing import Sequence


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count_all_threads() -> None:
    import torch
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    try:
        flag = ctypes.c_bool.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: cannot set c10's caffe2_report_cpu_memory_usage ({exc}); without it frees "
                           "on other threads go uncounted and no peak is measured") from None
    flag.value = True


@contextlib.contextmanager
def allocated_peak():
    """Yields a dict whose "peak" is, on exit, the most bytes held in CPU tensors at once
    inside the block, above what was held when it began."""
    import gc
    from torch.profiler import ProfilerActivity, profile
    result = {}
    _count_all_threads()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    if not memory:
        raise RuntimeError("the profiler recorded no CPU allocation: nothing measured")
    start = memory[0][1] - memory[0][2]
    result["peak"] = max(total for _, total, _ in memory) - start


def measured_rank(rank: int, world: int, argv: Sequence[str]) -> dict:
    """One rank of a pretraining run (inside testing.distributed.run_distributed, which may
    run several in turn): the peak bytes in tensors from just before the model is built to
    the end of training, above what the rank held before."""
    import megatron_vl.training.pretrain as pretrain_module
    stack = contextlib.ExitStack()
    peak = {}
    build = pretrain_module.build_model

    def measured_build(*args, **kwargs):
        peak.update(ref=stack.enter_context(allocated_peak()))
        return build(*args, **kwargs)
    pretrain_module.build_model = measured_build
    try:
        with stack:
            trainer = pretrain_module.pretrain(list(argv))
    finally:
        pretrain_module.build_model = build
    if trainer.exit_code:
        raise RuntimeError(f"training exited with {trainer.exit_code}")
    return {"measured": peak["ref"]["peak"]}


def predicted(argv: Sequence[str], world: int) -> dict:
    """The planner's bytes by part for the busiest rank of this run's layout, on the CPU (gloo)
    code paths the measured run takes."""
    from ..config import deepspeed_config, effective_zero_stage, load_config
    from ..plan.model import CPU_GLOO, Layout
    from ..plan.planner import rank_memory
    cfg, _ = load_config(list(argv))
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world // (tp * pp)
    layout = Layout(tp, pp, dp, effective_zero_stage(cfg), t.micro_batch_size, t.recompute_activations)
    return rank_memory(cfg, layout, t.global_batch_size or t.micro_batch_size * dp,
                       deepspeed_config(cfg, world), CPU_GLOO)


def measured_runs(rank: int, world: int, runs: Sequence[Sequence[str]]) -> list:
    """measured_rank for each argv of `runs` in turn, in one set of processes."""
    return [measured_rank(rank, world, argv)["measured"] for argv in runs]

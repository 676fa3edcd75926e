"""Throughput, FLOPs/MFU and the log sinks (console, TensorBoard, wandb)."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..config import Config

# Dense bf16 peak TFLOP/s per device, by name fragment (tensor cores, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def flops_per_token(cfg: Config) -> float:
    """Model FLOPs per trained token: plan/flops.py's formula (the one the planner and the GPU
    acceptance script use) on the model as training builds it, LoRA included."""
    from ..plan.flops import model_flops_per_token
    return model_flops_per_token(cfg)


def peak_tflops(cfg: Config) -> Optional[float]:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class StepStats:
    iteration: int
    train_iters: int
    consumed_samples: int
    lm_loss: float
    visual_loss: float
    lr: float
    grad_norm: Optional[float]
    skipped: int
    seconds_per_step: float
    global_batch: int
    loss_scale: Optional[float] = None


def throughput(stats: StepStats, cfg: Config, world_size: int) -> Dict[str, float]:
    samples = stats.global_batch / stats.seconds_per_step
    tokens = samples * cfg.model.seq_length
    tflops = tokens * flops_per_token(cfg) / world_size / 1e12
    peak = peak_tflops(cfg)
    return {"samples_per_s": samples, "tokens_per_s": tokens, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else float("nan"), "memory_gb": memory_gb()}


def format_line(stats: StepStats, rates: Dict[str, float]) -> str:
    width = len(str(stats.train_iters))
    parts = [f"iteration {stats.iteration:>{width}}/{stats.train_iters}",
             f"consumed samples: {stats.consumed_samples}",
             # 9 significant digits name a float32 exactly: resumed runs compare bit for bit.
             f"lm loss: {stats.lm_loss:.8E}", f"visual loss: {stats.visual_loss:.8E}",
             f"learning rate: {stats.lr:.6E}",
             f"grad norm: {stats.grad_norm:.4f}" if stats.grad_norm is not None else "grad norm: n/a",
             f"skipped: {stats.skipped}"]
    if stats.loss_scale is not None:
        parts.append(f"loss scale: {stats.loss_scale:.1f}")
    mfu = rates["mfu"]
    parts += [f"step time: {stats.seconds_per_step * 1000:.1f} ms",
              f"samples/s: {rates['samples_per_s']:.2f}", f"tokens/s: {rates['tokens_per_s']:.0f}",
              f"TFLOP/s/device: {rates['tflops_per_device']:.3f}",
              f"MFU: {mfu * 100:.1f}%" if mfu == mfu else "MFU: n/a (no peak: --peak-tflops)",
              f"mem: {rates['memory_gb']:.2f} GB"]
    return " | ".join(parts)


class Sinks:
    """TensorBoard when --tensorboard-dir is given; wandb when asked for and installed."""

    def __init__(self, cfg: Config, enabled: bool, log=print):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(cfg.logging.tensorboard_dir)
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                log("warning: --wandb-project given but wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict())

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v == v:   # skip NaN (e.g. MFU without a known peak)
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

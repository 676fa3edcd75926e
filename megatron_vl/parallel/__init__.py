"""Tensor/pipeline/data parallelism: the state object, collectives, layers, CE, RNG."""

from .state import DeepSpeedMPU, ParallelState, init_distributed

__all__ = ["DeepSpeedMPU", "ParallelState", "init_distributed"]

"""Tensor/pipeline/data parallelism: the rank layout (named axes), the state object,
collectives, layers, CE, RNG."""

from .layout import RankLayout
from .state import DeepSpeedMPU, ParallelState, init_distributed

__all__ = ["DeepSpeedMPU", "ParallelState", "RankLayout", "init_distributed"]

"""Which implementation an op takes: the fused kernel only on CUDA tensors, only when its
library imports, and only when the caller did not ask for the torch reference."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False


def fused_available(x: torch.Tensor, impl: str, module: str) -> bool:
    if impl not in ("auto", "torch", "reference", "fused"):
        raise ValueError(f"kernel choice {impl!r}: expected auto, torch or fused")
    if impl in ("torch", "reference") or not x.is_cuda:
        return False
    ok = importable(module)
    if impl == "fused" and not ok:
        raise RuntimeError(f"fused kernel requested but {module} does not import")
    return ok

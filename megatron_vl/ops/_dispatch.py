"""Which implementation an op takes: the fused kernel only on CUDA tensors, only when its
library imports, and only when the caller did not ask for the torch reference.

Choices (``--fused-kernels``): ``auto`` (fused where possible), ``torch`` (always the torch
path), ``require`` (the fused kernel or an error naming what is missing: checked once at start
by ``check_required``, and again by each op). ``fused`` is the per-call spelling of
``require`` the kernel tests use. Each op records what it ran (``implementations()``), so a
run can say once which kernels it really used.
"""

from __future__ import annotations

import functools
import importlib
from typing import Dict

import torch

# op -> the module its fused kernel comes from
KERNELS = {"attention": "flash_attn", "rms_norm": "liger_kernel.ops.rms_norm", "rope": "liger_kernel.ops.rope",
           "swiglu": "liger_kernel.ops.swiglu", "cross_entropy": "liger_kernel.ops.cross_entropy"}
CHOICES = ("auto", "torch", "require", "reference", "fused")
_used: Dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False


def record(op: str, implementation: str) -> None:
    _used[op] = implementation


def implementations() -> Dict[str, str]:
    """op -> the implementation it last ran in this process."""
    return dict(_used)


def check_required(impl: str, device_type: str, ops=tuple(KERNELS)) -> None:
    """For ``require``: raises naming every op whose fused kernel cannot run here."""
    if impl not in ("require", "fused"):
        return
    if device_type != "cuda":
        raise RuntimeError("--fused-kernels require: the fused kernels run on CUDA only; this run is on "
                           f"{device_type} (use auto or torch)")
    missing = [f"{op} ({KERNELS[op]})" for op in ops if not importable(KERNELS[op])]
    if missing:
        raise RuntimeError(f"--fused-kernels require: no fused kernel for {', '.join(missing)}: the module does not "
                           "import; install the gpu extra (pip install -e .[gpu]) or use --fused-kernels auto")


def fused_available(x: torch.Tensor, impl: str, module: str, op: str = "", fallback: str = "torch") -> bool:
    if impl not in CHOICES:
        raise ValueError(f"kernel choice {impl!r}: expected auto, torch or require")
    if impl in ("torch", "reference"):
        record(op, "reference" if impl == "reference" else fallback)
        return False
    ok = x.is_cuda and importable(module)
    if impl in ("fused", "require") and not ok:
        raise RuntimeError(f"fused kernel required for {op or module}, but "
                           + (f"{module} does not import" if x.is_cuda else "the tensor is not on CUDA"))
    record(op, module if ok else fallback)
    return ok

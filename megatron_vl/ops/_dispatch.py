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
from typing import Dict, Optional, Set, Tuple

import torch

# op -> the module its fused kernel comes from
KERNELS = {"attention": "flash_attn", "rms_norm": "liger_kernel.ops.rms_norm", "rope": "liger_kernel.ops.rope",
           "swiglu": "liger_kernel.ops.swiglu", "cross_entropy": "liger_kernel.ops.cross_entropy"}
CHOICES = ("auto", "torch", "require", "reference", "fused")
_used: Dict[str, str] = {}
_said: Set[Tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def import_error(module: str) -> Optional[str]:
    """Why `module` does not import ("ImportError: libcudart.so.12: cannot open ..."), or None."""
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # a broken CUDA extension raises more than ImportError
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def importable(module: str) -> bool:
    return import_error(module) is None


def _say_fallback_once(op: str, module: str) -> None:
    """Under auto on CUDA, a fused kernel that does not import is said once, with the reason
    (a broken flash-attn install would otherwise fall back unnoticed), by rank 0."""
    key = (op, module)
    if key in _said:
        return
    _said.add(key)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    print(f"fused kernels: {op or module} uses the torch path: {module} does not import ({import_error(module)})",
          flush=True)


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
    missing = [f"{op} ({KERNELS[op]}: {import_error(KERNELS[op])})" for op in ops if not importable(KERNELS[op])]
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
                           + (f"{module} does not import ({import_error(module)})" if x.is_cuda
                              else "the tensor is not on CUDA"))
    if x.is_cuda and not ok:
        _say_fallback_once(op, module)
    record(op, module if ok else fallback)
    return ok

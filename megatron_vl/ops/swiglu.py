"""SwiGLU on a fused gate/up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import fused_available


class _SwiGLU(torch.autograd.Function):
    """Keeps only the gate/up input for backward (two activation-sized tensors fewer than
    autograd through silu and mul would keep)."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_in = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_in.chunk(2, dim=-1)
        # Written straight into the halves of one buffer: no concatenation pass.
        torch.mul(grad, F.silu(gate), out=grad_up)
        grad_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
        return grad_in


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if fused_available(gate_up, impl, "liger_kernel.ops.swiglu", "swiglu"):
        from liger_kernel.ops import swiglu as liger
        if hasattr(liger, "LigerFusedGateUpSiLUMulFunction"):  # liger >= 0.8.2: no chunk copies
            return liger.LigerFusedGateUpSiLUMulFunction.apply(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return liger.LigerSiLUMulFunction.apply(gate.contiguous(), up.contiguous())
    return _SwiGLU.apply(gate_up)

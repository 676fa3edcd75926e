"""Each op's torch path against its reference; fused paths against the reference on CUDA
(through the parity helpers of megatron_vl/testing/kernel_parity.py)."""

import functools

import pytest
import torch

from megatron_vl import ops
from megatron_vl.parallel.cross_entropy import cross_entropy, fused_lm_head_loss
from megatron_vl.testing import kernel_parity


def _qkv(b=2, s=33, h=4, g=2, d=16):
    gen = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(b, s, heads, d, generator=gen).requires_grad_()  # noqa: E731
    return make(h), make(g), make(g)


@pytest.mark.parametrize("segments", [False, True])
def test_sdpa_attention_equals_reference(segments):
    q, k, v = _qkv()
    seg = torch.tensor([[0] * 10 + [1] * 23, [0] * 33]) if segments else None
    out = ops.attention(q, k, v, seg, impl="torch")
    ref = ops.attention_reference(q, k, v, seg)
    assert (out - ref).abs().max().item() <= 1e-6
    gout = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), gout)
    gb = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(ga, gb):
        assert (a - b).abs().max().item() <= 1e-5


def test_swiglu_backward_is_exact():
    x = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.swiglu(t, impl="torch"), (x,))
    y = torch.randn(4, 8, dtype=torch.float32)
    assert torch.equal(ops.swiglu(y), ops.swiglu_reference(y))


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = torch.randn(3, 5, 32)
    hf = LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    assert torch.equal(ops.rms_norm(x, hf.weight, 1e-6), hf(x))


def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=512)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = ops.rope_inv_freq(64, 500000.0, {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}})
    assert torch.equal(ours, hf_inv_freq.float())


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="kernel choice 'fast': expected auto, torch or require"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, impl="fast")


# --- fused kernels on CUDA -----------------------------------------------------------------
# The parity helpers tests/test_kernel_parity.py proves on CPU (stand-in kernels that write into
# their inputs pass, deliberately wrong ones fail), here on the real fused paths: impl="fused"
# raises rather than falls back. Each helper copies the inputs per path, runs the reference
# first, feeds the model's layouts (q/k/v split from one fused qkv, per-row positions and
# documents) and compares forward and backward with kernel_parity.TOLERANCES.

FP32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_fused_rms_norm_matches_reference(dtype):
    kernel_parity.check_rms_norm(lambda x, w, eps: ops.rms_norm(x, w, eps, impl="fused"), dtypes=(dtype,),
                                 device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_fused_rope_matches_reference(dtype):
    kernel_parity.check_rope(lambda q, k, cos, sin: ops.apply_rope(q, k, cos, sin, impl="fused"), dtypes=(dtype,),
                             device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_fused_swiglu_matches_reference(dtype):
    kernel_parity.check_swiglu(lambda gate_up: ops.swiglu(gate_up, impl="fused"), dtypes=(dtype,), device="cuda")


@pytest.mark.gpu
def test_fused_attention_matches_reference():
    """flash-attn (half precision only): causal, varlen from segment ids, and varlen from
    boundaries built on the host beside the batch as training does."""
    kernel_parity.check_attention(lambda q, k, v, seg: ops.attention(q, k, v, seg, impl="fused"), dtypes=(BF16,),
                                  device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("entry", ["ops.fused_cross_entropy", "cross_entropy(inplace=True)"])
def test_fused_cross_entropy_matches_reference(dtype, entry):
    """liger's kernel directly, and through the call the LM head makes (logits overwritten)."""
    if entry == "ops.fused_cross_entropy":
        def candidate(logits, target):
            return ops.fused_cross_entropy(logits, target, impl="fused")
    else:
        def candidate(logits, target):
            return cross_entropy(logits, target, impl="require", inplace=True)
    kernel_parity.check_cross_entropy(candidate, dtypes=(dtype,), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_chunked_lm_head_loss_matches_reference(dtype):
    """The loss training takes, on CUDA; two tokens per chunk, so bf16 accumulation of the
    head gradient across ~1000 chunks would show."""
    kernel_parity.check_lm_head_loss(functools.partial(fused_lm_head_loss, chunk_size=2), dtypes=(dtype,),
                                     device="cuda")


def test_require_refuses_cpu_and_names_missing_kernels():
    from megatron_vl.ops._dispatch import check_required
    with pytest.raises(RuntimeError, match="--fused-kernels require: the fused kernels run on CUDA only"):
        check_required("require", "cpu")
    with pytest.raises(RuntimeError, match="fused kernel required for rms_norm, but the tensor is not on CUDA"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, impl="require")
    check_required("auto", "cpu")   # the other choices need nothing
    ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, impl="auto")
    assert ops.implementations()["rms_norm"] == "torch"

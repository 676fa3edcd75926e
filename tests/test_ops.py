"""Each op's torch path against its reference; fused paths against the reference on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from megatron_vl import ops


def _qkv(device="cpu", dtype=torch.float32, b=2, s=33, h=4, g=2, d=16):
    gen = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(b, s, heads, d, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
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
# Each demands its fused kernel (impl="require": a missing kernel fails, never falls back)
# and compares forward and backward with the reference.

def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_rope_swiglu_match_reference(dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.rand(256, device="cuda", dtype=dtype) + 0.5).requires_grad_()
    a, b = ops.rms_norm(x, w, 1e-6, "require"), ops.rms_norm_reference(x, w, 1e-6)
    assert ops.implementations()["rms_norm"] == "liger_kernel.ops.rms_norm"
    assert (a - b).abs().max() <= tol
    g = torch.randn_like(a)
    for ga, gb in zip(_grads(a, (x, w), g), _grads(b, (x, w), g)):
        assert (ga.float() - gb.float()).abs().max() <= tol * 10
    gu = torch.randn(4, 64, 512, device="cuda", dtype=dtype, requires_grad=True)
    a, b = ops.swiglu(gu, "require"), ops.swiglu_reference(gu)
    assert (a - b).abs().max() <= tol
    g = torch.randn_like(a)
    assert (_grads(a, (gu,), g)[0].float() - _grads(b, (gu,), g)[0].float()).abs().max() <= tol * 10
    q, k, _ = _qkv("cuda", dtype)
    pos = torch.arange(q.shape[1], device="cuda").unsqueeze(0).expand(q.shape[0], -1)
    cos, sin = ops.rope_cos_sin(pos, ops.rope_inv_freq(q.shape[-1], 10000.0), dtype)
    fused, ref = ops.apply_rope(q, k, cos, sin, "require"), ops.apply_rope_reference(q, k, cos, sin)
    for a, b in zip(fused, ref):
        assert (a - b).abs().max() <= tol
    g = [torch.randn_like(t) for t in ref]
    for ga, gb in zip(torch.autograd.grad(fused, (q, k), g), torch.autograd.grad(ref, (q, k), g)):
        assert (ga.float() - gb.float()).abs().max() <= tol * 10


@pytest.mark.gpu
@pytest.mark.parametrize("segments", ["none", "tensor", "host-documents"])
def test_fused_attention_matches_reference(segments):
    """flash-attn, causal and varlen (segment ids, or boundaries built on the host beside the
    batch as training does), forward and backward."""
    q, k, v = _qkv("cuda", torch.bfloat16, s=128)
    seg_cpu = torch.tensor([[0] * 50 + [1] * 78, [0] * 100 + [1] * 28])
    seg = None if segments == "none" else seg_cpu.cuda()
    if segments == "host-documents":
        docs = ops.documents_from_segments(seg_cpu)
        seg = ops.Documents(seg, docs.cu_seqlens.cuda(), docs.max_seqlen)
    fused = ops.attention(q, k, v, seg, impl="require")
    assert ops.implementations()["attention"] == "flash_attn"
    ref = ops.attention_reference(q, k, v, None if seg is None else seg_cpu.cuda())
    assert (fused.float() - ref.float()).abs().max() <= 2e-2
    g = torch.randn_like(fused)
    for ga, gb in zip(_grads(fused, (q, k, v), g), _grads(ref, (q, k, v), g)):
        assert (ga.float() - gb.float()).abs().max() <= 5e-2


@pytest.mark.gpu
def test_fused_cross_entropy_matches_reference():
    logits = (torch.randn(64, 1000, device="cuda") * 10).requires_grad_()
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[:5] = -100
    fused = ops.fused_cross_entropy(logits, target, impl="require")
    ref = F.cross_entropy(logits, target, reduction="none")
    assert (fused - ref).abs().max() <= 1e-4
    g = torch.randn_like(ref)
    assert (_grads(fused, (logits,), g)[0] - _grads(ref, (logits,), g)[0]).abs().max() <= 1e-4


def test_require_refuses_cpu_and_names_missing_kernels():
    from megatron_vl.ops._dispatch import check_required
    with pytest.raises(RuntimeError, match="--fused-kernels require: the fused kernels run on CUDA only"):
        check_required("require", "cpu")
    with pytest.raises(RuntimeError, match="fused kernel required for rms_norm, but the tensor is not on CUDA"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, impl="require")
    check_required("auto", "cpu")   # the other choices need nothing
    ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, impl="auto")
    assert ops.implementations()["rms_norm"] == "torch"

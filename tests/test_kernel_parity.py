"""The kernel parity helpers (megatron_vl/testing/kernel_parity.py) on CPU, against stand-in
kernels: the GPU tests in test_ops.py run the same helpers on the real fused kernels, so these
tests are the proof that those can fail. A correct kernel that writes into its inputs the way
Liger does must pass; each deliberately wrong kernel must fail, in every dtype the GPU test
runs it in where the error is larger than bf16 rounding."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_vl import ops
from megatron_vl.parallel.cross_entropy import cross_entropy, fused_lm_head_loss
from megatron_vl.testing import kernel_parity as kp

FP32, BF16 = torch.float32, torch.bfloat16
BOTH = (FP32, BF16)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x, cos, sin):
    return x * cos.unsqueeze(2) + _rotate_half(x) * sin.unsqueeze(2)


# --- correct kernels that write into their inputs, as Liger's do ------------------------------

class InPlaceRope(torch.autograd.Function):
    """Liger's RoPE: rotates q/k in place when they are contiguous (copies otherwise) and
    returns them; backward rotates the incoming gradients in place the other way."""
    mutated = 0

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        out = []
        for x in (q, k):
            if x.is_contiguous():
                x.copy_(_rotate(x, cos, sin))
                InPlaceRope.mutated += 1
                out.append(x)
            else:
                out.append(_rotate(x, cos, sin))
        return tuple(out)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = []
        for g in (dq, dk):
            g = g.contiguous()
            g.copy_(_rotate(g, cos, -sin))
            grads.append(g)
        return grads[0], grads[1], None, None


class InPlaceCrossEntropy(torch.autograd.Function):
    """Liger's CE: forward writes d loss / d logits over the logits it was given and keeps
    them; backward scales that buffer in place by the per-position gradient."""

    @staticmethod
    def forward(ctx, logits, target):
        flat, t = logits.view(-1, logits.shape[-1]), target.reshape(-1)
        x = flat.float()
        lse = x.logsumexp(-1)
        ignored = t == -100
        tt = t.masked_fill(ignored, 0)
        loss = (lse - x.gather(1, tt[:, None])[:, 0]).masked_fill(ignored, 0.0)
        grad = (x - lse[:, None]).exp()
        grad[torch.arange(len(tt)), tt] -= 1.0
        flat.copy_(grad.masked_fill(ignored[:, None], 0.0))   # the caller's logits are gone now
        ctx.save_for_backward(flat.detach())   # as liger does
        ctx.shape = logits.shape
        return loss.to(logits.dtype).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        (flat,) = ctx.saved_tensors
        flat.mul_(grad_loss.reshape(-1, 1).to(flat.dtype))
        return flat.view(ctx.shape), None


class InPlaceRMSNorm(torch.autograd.Function):
    """Liger's RMSNorm with in_place=True: backward writes d x over the incoming gradient."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        normed = (h * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        h = x.float() * rstd
        gw = (dy.float() * h).reshape(-1, h.shape[-1]).sum(0)
        gh = dy.float() * weight.float()
        dx = rstd * (gh - h * (gh * h).mean(-1, keepdim=True))
        dy.copy_(dx)
        return dy, gw.to(weight.dtype), None


class InPlaceSwiGLU(torch.autograd.Function):
    """Liger's SiLU-mul: backward writes the input gradient over the saved gate/up input."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = (t.float() for t in gate_up.chunk(2, dim=-1))
        sig = torch.sigmoid(gate)
        g = grad.float()
        d_up, d_gate = g * gate * sig, g * up * sig * (1 + gate * (1 - sig))
        gate_up.copy_(torch.cat([d_gate, d_up], dim=-1))
        return gate_up


# --- deliberately wrong kernels ----------------------------------------------------------------

def rope_halves_swapped(q, k, cos, sin):
    """rotate_half with its halves swapped: rotates by -theta."""
    def wrong(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.unsqueeze(2) + torch.cat((x2, -x1), dim=-1) * sin.unsqueeze(2)
    return wrong(q), wrong(k)


def rope_first_row_positions(q, k, cos, sin):
    """Every row rotated with row 0's positions (a kernel that ignores the batch dim of cos)."""
    return ops.apply_rope_reference(q, k, cos[:1].expand_as(cos), sin[:1].expand_as(sin))


def rope_reads_storage_as_contiguous(q, k, cos, sin):
    """Reads q/k memory with contiguous strides whatever their real strides."""
    def raw(x):
        return torch.as_strided(x, x.shape, torch.empty(x.shape, device="meta").stride(), x.storage_offset())
    return ops.apply_rope_reference(raw(q), raw(k), cos, sin)


def ce_label_smoothing(logits, target):
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           label_smoothing=0.01, reduction="none")
    return flat.view(target.shape)


class CEOneGradientScale(torch.autograd.Function):
    """Backward scales every row by the first position's gradient (liger's element_mul with a
    per-position gradient before it learned reduction='none')."""

    @staticmethod
    def forward(ctx, logits, target):
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            loss = kp.cross_entropy_reference(x, target)
            (g,) = torch.autograd.grad(loss.sum(), x)
        ctx.save_for_backward(g)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        return (g * grad_loss.reshape(-1)[0]).to(g.dtype), None


def rms_norm_eps_1e3(x, weight, eps):
    return ops.rms_norm_reference(x, weight, 1e-3)


def _documents_shifted(segments):
    """Segment ids with each document after the first in a row starting one token late."""
    seg = segments.segment_ids if isinstance(segments, ops.Documents) else segments
    shifted = seg.clone()
    starts = torch.zeros_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    shifted[starts] = seg[:, :-1][starts[:, 1:]]
    return shifted


def attention_boundary_off_by_one(q, k, v, segments):
    return ops.attention_reference(q, k, v, None if segments is None else _documents_shifted(segments))


def attention_gqa_tiled(q, k, v, segments):
    """kv heads tiled (head j serves q heads j, j + g, ...) instead of interleaved."""
    rep = q.shape[2] // k.shape[2]
    return ops.attention_reference(q, k.repeat(1, 1, rep, 1), v.repeat(1, 1, rep, 1), segments)


def swiglu_gate_up_swapped(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(up) * gate


class _ChunkedHeadLoss(torch.autograd.Function):
    """A chunked LM-head loss written plainly, with the two ways to get it wrong as switches."""

    @staticmethod
    def forward(ctx, hidden, weight, target, loss_weights, vocab_size, chunk, accumulate, drop_last):
        n = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
        losses = torch.zeros(n, device=hidden.device)
        padding = torch.arange(weight.shape[0], device=hidden.device) >= vocab_size
        # the classic loop bug: stopping one chunk early drops the last (partial) chunk
        for start in range(0, n - chunk if drop_last else n, chunk):
            end = min(start + chunk, n)
            h, t = hidden[start:end], target[start:end]
            logp = (h @ weight.t()).float().masked_fill(padding, float("-inf")).log_softmax(-1)
            ignored = t == -100
            tt = t.masked_fill(ignored, 0)
            losses[start:end] = -logp.gather(1, tt[:, None])[:, 0].masked_fill(ignored, 0.0)
            g = logp.exp()
            g[torch.arange(end - start), tt] -= 1.0
            g = (g * loss_weights[start:end, None].masked_fill(ignored[:, None], 0.0)).to(hidden.dtype)
            grad_hidden[start:end] = g @ weight
            grad_weight += g.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.head_trains = weight.requires_grad
        ctx.mark_non_differentiable(losses)
        return (losses * loss_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total, grad_weight * grad_total if ctx.head_trains else None,
                None, None, None, None, None, None)


def chunked_head_loss(hidden, weight, target, loss_weights, vocab_size, chunk=2, accumulate=FP32,
                      drop_last=False):
    total, losses = _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                           loss_weights.reshape(-1), vocab_size, chunk, accumulate, drop_last)
    return total, losses.view(target.shape)


def head_bf16_accumulation(hidden, weight, target, loss_weights, vocab_size):
    return chunked_head_loss(hidden, weight, target, loss_weights, vocab_size, accumulate=weight.dtype)


def head_last_chunk_dropped(hidden, weight, target, loss_weights, vocab_size):
    return chunked_head_loss(hidden, weight, target, loss_weights, vocab_size, chunk=24, drop_last=True)


# --- the table: helper -> correct candidates (must pass), wrong ones (must fail) ----------------

HELPERS = {
    "attention": kp.check_attention, "rope": kp.check_rope, "rms_norm": kp.check_rms_norm,
    "swiglu": kp.check_swiglu, "cross_entropy": kp.check_cross_entropy, "lm_head_loss": kp.check_lm_head_loss,
}

CORRECT = {
    "attention": {"torch sdpa": lambda q, k, v, s: ops.attention(q, k, v, s, impl="torch")},
    "rope": {"torch": lambda q, k, c, s: ops.apply_rope(q, k, c, s, impl="torch"),
             "in place (liger)": InPlaceRope.apply},
    "rms_norm": {"torch": lambda x, w, e: ops.rms_norm(x, w, e, impl="torch"),
                 "d x into d y (liger in_place)": InPlaceRMSNorm.apply},
    "swiglu": {"torch": lambda g: ops.swiglu(g, impl="torch"), "grad into input (liger)": InPlaceSwiGLU.apply},
    "cross_entropy": {"vocab-parallel, inplace": lambda l, t: cross_entropy(l, t, impl="torch", inplace=True),
                      "grad into logits (liger)": InPlaceCrossEntropy.apply},
    "lm_head_loss": {"fused_lm_head_loss": functools.partial(fused_lm_head_loss, chunk_size=2),
                     "plain chunked, fp32 accumulation": chunked_head_loss},
}

# name -> (kernel, wrong candidate, dtypes it must fail in: both, which its GPU test runs, but
# for the bf16 accumulator, which with float32 weights is a float32 one)
WRONG = {
    "rope halves swapped": ("rope", rope_halves_swapped, BOTH),
    "rope row 0's positions for every row": ("rope", rope_first_row_positions, BOTH),
    "rope reads strided q/k as contiguous": ("rope", rope_reads_storage_as_contiguous, BOTH),
    "cross-entropy label smoothing 0.01": ("cross_entropy", ce_label_smoothing, BOTH),
    "cross-entropy one gradient scale for all rows": ("cross_entropy", CEOneGradientScale.apply, BOTH),
    "rms_norm eps 1e-3": ("rms_norm", rms_norm_eps_1e3, BOTH),
    "attention document boundary off by one": ("attention", attention_boundary_off_by_one, BOTH),
    "attention kv heads tiled, not interleaved": ("attention", attention_gqa_tiled, BOTH),
    "swiglu gate/up swapped": ("swiglu", swiglu_gate_up_swapped, BOTH),
    "lm-head loss last chunk dropped": ("lm_head_loss", head_last_chunk_dropped, BOTH),
    "lm-head grad_weight accumulated in bf16": ("lm_head_loss", head_bf16_accumulation, (BF16,)),
}


def _naive_attention(q, k, v, segments):
    """Every op in the input dtype (scores and probabilities rounded too)."""
    seg = segments.segment_ids if isinstance(segments, ops.Documents) else segments
    s, rep = q.shape[1], q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    if seg is not None:
        mask = mask & (seg.unsqueeze(-1) == seg.unsqueeze(-2)).unsqueeze(1)
    scores = (qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vt).transpose(1, 2)


def _naive_cross_entropy(logits, target):
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return flat.view(target.shape)


def _naive_head_loss(hidden, weight, target, loss_weights, vocab_size):
    """Logits in the input dtype (as Megatron's head computes them), one matmul per gradient."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    padding = torch.arange(weight.shape[0]) >= vocab_size
    losses = F.cross_entropy(logits.masked_fill(padding, float("-inf")).float(), target.reshape(-1),
                             reduction="none")
    return (losses * loss_weights.reshape(-1)).sum(), losses.view(target.shape)


# Plain bf16 autograd of each op's math: what the bf16 row of TOLERANCES must leave room for.
PLAIN_BF16 = {
    "attention": _naive_attention, "rope": ops.apply_rope_reference, "rms_norm": ops.rms_norm_reference,
    "swiglu": ops.swiglu_reference, "cross_entropy": _naive_cross_entropy, "lm_head_loss": _naive_head_loss,
}


@pytest.mark.parametrize("kernel,name", [(k, n) for k, impls in CORRECT.items() for n in impls])
def test_correct_kernel_passes(kernel, name):
    comparisons = HELPERS[kernel](CORRECT[kernel][name])
    assert {c.case.split(",")[0] for c in comparisons} == {"float32", "bfloat16"}
    assert all(c.ok for c in comparisons)


@pytest.mark.parametrize("name,dtype", [(n, d) for n, (_, _, dtypes) in sorted(WRONG.items()) for d in dtypes],
                         ids=lambda p: str(p).replace("torch.", ""))
def test_wrong_kernel_fails(name, dtype):
    kernel, wrong, _ = WRONG[name]
    with pytest.raises(AssertionError, match=rf"^{kernel}: \d+ of \d+ comparisons out of tolerance"):
        HELPERS[kernel](wrong, dtypes=(dtype,))


@pytest.mark.parametrize("kernel", sorted(PLAIN_BF16))
def test_bf16_tolerance_leaves_room_for_plain_bf16_math(kernel):
    """A fused kernel keeps fp32 statistics and accumulators, so it is at least as accurate as
    plain bf16 math; that math must use at most 2/3 of the bf16 tolerance."""
    comparisons = HELPERS[kernel](PLAIN_BF16[kernel], dtypes=(BF16,))
    worst = max(comparisons, key=lambda c: c.ratio)
    assert worst.ratio <= 2 / 3, str(worst)


def test_in_place_stand_ins_really_write_into_their_inputs():
    """Else their passing would prove nothing about the helpers' separate copies."""
    before = InPlaceRope.mutated
    kp.check_rope(InPlaceRope.apply, dtypes=(FP32,))
    assert InPlaceRope.mutated > before           # the helper fed contiguous q/k in some case
    logits = torch.randn(4, 10, requires_grad=True)
    kept = logits.detach().clone()
    InPlaceCrossEntropy.apply(logits, torch.tensor([1, 2, -100, 3]))
    assert not torch.equal(logits.detach(), kept)
    x, w = torch.randn(3, 8, requires_grad=True), torch.ones(8, requires_grad=True)
    dy = torch.randn(3, 8)
    sent = dy.clone()
    InPlaceRMSNorm.apply(x, w, 1e-6).backward(sent)
    assert not torch.equal(sent, dy)
    gate_up = torch.randn(3, 8, requires_grad=True)
    kept = gate_up.detach().clone()
    InPlaceSwiGLU.apply(gate_up).backward(torch.ones(3, 4))
    assert not torch.equal(gate_up.detach(), kept)


def test_failure_names_kernel_case_tensor_and_error():
    with pytest.raises(AssertionError) as err:
        kp.check_rms_norm(rms_norm_eps_1e3, dtypes=(FP32,))
    assert str(err.value).startswith("rms_norm: 3 of 3 comparisons out of tolerance:\n  rms_norm [float32, residual "
                                     "stream] y: |candidate - reference| = ")
    assert all(not c.ok for c in err.value.comparisons)


def test_compare_reports_what_cannot_be_compared():
    tol = kp.TOLERANCES[FP32][0]
    assert kp.compare("k", "c", "grad x", None, torch.ones(2), tol).problem == "the candidate gives no gradient"
    assert kp.compare("k", "c", "grad w", torch.ones(2), None, tol).problem == \
        "the reference has no gradient here, the candidate has one"
    assert kp.compare("k", "c", "y", torch.ones(3), torch.ones(2), tol).problem == "shape (3,), the reference's is (2,)"
    nan = kp.compare("k", "c", "y", torch.tensor([1.0, float("nan")]), torch.ones(2), tol)
    assert not nan.ok and nan.where == (1,)
    assert kp.compare("k", "c", "y", torch.ones(2) * (1 + 5e-6), torch.ones(2), tol).ok

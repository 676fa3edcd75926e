"""Parity checks for the fused kernels: one helper per op, forward and backward.

The GPU tests run these helpers on the real fused paths; the CPU suite runs the same helpers
on stand-in kernels (correct ones that write into their inputs as Liger does must pass,
deliberately wrong ones must fail), which is how we know without a GPU that the GPU tests can
fail. Every helper:

- builds its inputs in the layouts the model feeds: q/k/v as non-contiguous views split from
  one fused qkv projection (and, separately, contiguous: Liger's RoPE rotates those in place),
  per-row position ids and document boundaries that differ between the rows of a packed batch,
  in each dtype asked for;
- gives each path its own copy of every input and every output gradient, so a kernel that
  writes into them cannot corrupt the other path;
- runs the reference first, in float32 on exactly the values the candidate gets (inputs are
  rounded to the candidate's dtype once, up front), then the candidate;
- compares outputs and input gradients element by element with ``TOLERANCES`` and raises a
  ``ParityError`` (an AssertionError) naming the kernel, case, tensor and worst error, or
  returns every comparison with its margin.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops

FP32, BF16 = torch.float32, torch.bfloat16
QKV_VIEWS, CONTIGUOUS = "qkv views", "contiguous"


@dataclass(frozen=True)
class Tolerance:
    """Allowed per element: rtol * |reference| + atol * rms(reference)."""
    rtol: float
    """relative to the element's own reference value"""
    atol: float
    """relative to the root-mean-square of the whole reference tensor: slack at the tensor's
    own scale for elements that cancel to near zero"""


# The candidate's input dtype -> (outputs, input gradients). float32 leaves room for summation
# order only. bfloat16 (unit roundoff 2**-8 = 3.9e-3): 8 roundings for outputs, 16 for
# gradients (sums of bf16-rounded terms); plain bf16 autograd of each op's math, every
# intermediate rounded, uses at most 2/3 of it on the inputs these helpers build (checked in
# tests/test_kernel_parity.py), and a fused kernel keeping fp32 statistics is no worse.
TOLERANCES: Dict[torch.dtype, Tuple[Tolerance, Tolerance]] = {
    FP32: (Tolerance(rtol=1e-5, atol=1e-5), Tolerance(rtol=1e-4, atol=1e-4)),
    BF16: (Tolerance(rtol=3.2e-2, atol=3.2e-2), Tolerance(rtol=6.4e-2, atol=6.4e-2)),
}


@dataclass(frozen=True)
class Comparison:
    kernel: str
    case: str
    tensor: str
    error: float
    """|candidate - reference| at the worst element (the one nearest its tolerance, or past it)"""
    allowed: float
    """the tolerance at that element"""
    where: Tuple[int, ...]
    problem: str = ""
    """set when the tensors cannot be compared (shape, dtype, a missing or extra gradient)"""

    @property
    def ratio(self) -> float:
        """error / allowed: above 1 fails."""
        if self.problem:
            return float("inf")
        return self.error / self.allowed if self.allowed > 0 else (0.0 if self.error == 0 else float("inf"))

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def __str__(self) -> str:
        head = f"{self.kernel} [{self.case}] {self.tensor}: "
        if self.problem:
            return head + self.problem
        return (head + f"|candidate - reference| = {self.error:.3g} at {list(self.where)}, tolerance there "
                f"{self.allowed:.3g} ({self.ratio:.3g}x)")


class ParityError(AssertionError):
    """A candidate kernel out of tolerance; .comparisons holds every comparison made."""

    def __init__(self, kernel: str, comparisons: List[Comparison]):
        failed = [c for c in comparisons if not c.ok]
        super().__init__(f"{kernel}: {len(failed)} of {len(comparisons)} comparisons out of tolerance:\n"
                         + "\n".join(f"  {c}" for c in sorted(failed, key=lambda c: -c.ratio)))
        self.comparisons = comparisons


def compare(kernel: str, case: str, tensor: str, candidate: Optional[torch.Tensor],
            reference: Optional[torch.Tensor], tol: Tolerance) -> Comparison:
    def problem(text):
        return Comparison(kernel, case, tensor, float("inf"), 0.0, (), text)
    if reference is None or candidate is None:
        if reference is None and candidate is None:
            return Comparison(kernel, case, tensor, 0.0, 0.0, ())
        return problem("the reference has no gradient here, the candidate has one" if reference is None
                       else "the candidate gives no gradient")
    if tuple(candidate.shape) != tuple(reference.shape):
        return problem(f"shape {tuple(candidate.shape)}, the reference's is {tuple(reference.shape)}")
    if not reference.numel():
        return Comparison(kernel, case, tensor, 0.0, 0.0, ())
    c, r = candidate.detach().float(), reference.detach().float()
    err = (c - r).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    allowed = tol.rtol * r.abs() + tol.atol * r.pow(2).mean().sqrt()
    ratio = err / allowed.clamp_min(torch.finfo(torch.float32).tiny)
    flat = int(ratio.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), r.shape)) if r.dim() else ()
    return Comparison(kernel, case, tensor, float(err.reshape(-1)[flat]), float(allowed.reshape(-1)[flat]), where)


@contextlib.contextmanager
def _exact_fp32():
    """The reference's float32 matmuls in full float32 (no TF32 on CUDA)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# A path runs one implementation on its own copies of the inputs: (kernel fn, dtype) ->
# (outputs, input gradients), both by name; outputs are snapshots taken before backward.
Path = Callable[[Callable, torch.dtype], Tuple[Dict[str, torch.Tensor], Dict[str, Optional[torch.Tensor]]]]


def _check(kernel: str, candidate: Callable, reference: Callable,
           cases: Iterable[Tuple[str, torch.dtype, Path]], keeps_dtype: Sequence[str] = ()) -> List[Comparison]:
    """Runs every case (reference first) and compares; keeps_dtype: outputs that must come
    back in the candidate's input dtype."""
    out: List[Comparison] = []
    for case, dtype, run in cases:
        case = f"{_dtype_name(dtype)}, {case}"
        with _exact_fp32():
            ref_out, ref_grads = run(reference, FP32)
        cand_out, cand_grads = run(candidate, dtype)
        fwd_tol, grad_tol = TOLERANCES[dtype]
        for name, ref in ref_out.items():
            cand = cand_out[name]
            if name in keeps_dtype and cand.dtype != dtype:
                out.append(Comparison(kernel, case, name, float("inf"), 0.0, (),
                                      f"dtype {cand.dtype}, expected {dtype}"))
                continue
            out.append(compare(kernel, case, name, cand, ref, fwd_tol))
        out.extend(compare(kernel, case, name, cand_grads.get(name), ref, grad_tol) for name, ref in ref_grads.items())
    if not all(c.ok for c in out):
        raise ParityError(kernel, out)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """t rounded to the candidate's dtype once, kept in float32: both paths get these values."""
    return t.to(dtype).float().to(device)


def _leaf(t: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    """A fresh contiguous copy for one path."""
    return t.detach().to(dtype).clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _backward(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Backward with this path's own copy of each output gradient (a kernel may write over it)."""
    pairs = [(o, _leaf(g, o.dtype, False)) for o, g in zip(outputs, grads) if o.requires_grad]
    if not pairs:
        return   # an output cut off from autograd: its inputs get no gradient, and the comparison says so
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


# --- attention, RoPE: q/k/v in the model's layout --------------------------------------------

def _qkv(base: torch.Tensor, heads: Sequence[int], layout: str, dtype: torch.dtype):
    """q, k, v [b, s, heads_i, d] for one path, and a function giving their gradients.
    QKV_VIEWS: split from one fused [b, s, (h + 2g) d] leaf, as LlamaAttention does
    (non-contiguous); CONTIGUOUS: three separate leaves."""
    b, s, _ = base.shape
    d = base.shape[-1] // sum(heads)
    sizes = [n * d for n in heads]
    if layout == QKV_VIEWS:
        fused = _leaf(base, dtype)
        parts, leaves = fused.split(sizes, dim=-1), [fused]
    else:
        parts = leaves = [_leaf(p, dtype) for p in base.split(sizes, dim=-1)]
    tensors = [p.view(b, s, n, d) for p, n in zip(parts, heads)]

    def grads():
        if layout == QKV_VIEWS:
            g = leaves[0].grad
            pieces = g.split(sizes, dim=-1) if g is not None else [None] * 3
        else:
            pieces = [leaf.grad for leaf in leaves]
        return [None if p is None else p.reshape(b, s, n, d) for p, n in zip(pieces, heads)]
    return tensors, grads


def packed_segment_ids(batch: int, seq: int) -> torch.Tensor:
    """Document index per position, different in every row: documents of length 1 at both
    ends of row 0, one whole-row document, boundaries at odd offsets."""
    plans = [[1, seq // 3, seq - seq // 3 - 2, 1], [seq], [seq // 2 - 1, 1, seq - seq // 2]]
    if seq < 8:
        raise ValueError(f"packed_segment_ids: seq {seq} is too short for the document plans (at least 8)")
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(plans[r % len(plans)])]) for r in range(batch)]
    return torch.stack(rows)


def packed_position_ids(segment_ids: torch.Tensor, first_offsets: Sequence[int] = (0, 0, 1000)) -> torch.Tensor:
    """Positions restarting at each document (data.reset_position_ids), the row's first
    document continuing from first_offsets[row] (a long document cut across samples): no two
    rows share their position ids."""
    b, s = segment_ids.shape
    idx = torch.arange(s)
    pos = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        starts = torch.cat([torch.ones(1, dtype=torch.bool), segment_ids[r, 1:] != segment_ids[r, :-1]])
        pos[r] = idx - torch.cummax(torch.where(starts, idx, 0), dim=0).values
        pos[r, segment_ids[r] == segment_ids[r, 0]] += first_offsets[r % len(first_offsets)]
    return pos


def _copy_segments(segments):
    if isinstance(segments, ops.Documents):
        return ops.Documents(segments.segment_ids.clone(), segments.cu_seqlens.clone(), segments.max_seqlen)
    return None if segments is None else segments.clone()


def check_attention(candidate: Callable, reference: Callable = ops.attention_reference,
                    dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 3, seq: int = 64,
                    heads: int = 6, kv_heads: int = 2, head_dim: int = 32) -> List[Comparison]:
    """candidate(q, k, v, segments) -> out [b, s, heads, d]: causal grouped-query attention,
    segments None (causal), a [b, s] segment-id tensor, or ops.Documents built on the host
    beside the batch (varlen boundaries) as training does."""
    seg_cpu = packed_segment_ids(batch, seq)
    docs = ops.documents_from_segments(seg_cpu)
    seg = seg_cpu.to(device)
    segments = {"causal": None, "segment ids": seg,
                "host documents": ops.Documents(seg, docs.cu_seqlens.to(device), docs.max_seqlen)}
    counts = [heads, kv_heads, kv_heads]

    def cases():
        for dtype in dtypes:
            gen = _gen(0)
            base = _base(torch.randn(batch, seq, sum(counts) * head_dim, generator=gen), dtype, device)
            gout = _base(torch.randn(batch, seq, heads, head_dim, generator=gen), dtype, device)
            for seg_name, seg_arg in segments.items():
                for layout in (QKV_VIEWS, CONTIGUOUS):
                    def run(fn, path_dtype, layout=layout, seg_arg=seg_arg, base=base, gout=gout):
                        (q, k, v), grads = _qkv(base, counts, layout, path_dtype)
                        out = fn(q, k, v, _copy_segments(seg_arg))
                        snap = _snapshot(out)
                        _backward([out], [gout])
                        gq, gk, gv = grads()
                        return {"out": snap}, {"grad q": gq, "grad k": gk, "grad v": gv}
                    yield f"{seg_name}, {layout}", dtype, run
    return _check("attention", candidate, reference, cases(), keeps_dtype=("out",))


def check_rope(candidate: Callable, reference: Callable = ops.apply_rope_reference,
               dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 3, seq: int = 64,
               heads: int = 6, kv_heads: int = 2, head_dim: int = 32, base: float = 10000.0) -> List[Comparison]:
    """candidate(q, k, cos, sin) -> (q, k) rotated; cos/sin [b, s, d] from per-row position ids
    of a packed batch, in the candidate's dtype as the model builds them."""
    pos = packed_position_ids(packed_segment_ids(batch, seq)).to(device)
    counts = [heads, kv_heads, kv_heads]

    def cases():
        for dtype in dtypes:
            gen = _gen(1)
            qkv = _base(torch.randn(batch, seq, sum(counts) * head_dim, generator=gen), dtype, device)
            gq_out = _base(torch.randn(batch, seq, heads, head_dim, generator=gen), dtype, device)
            gk_out = _base(torch.randn(batch, seq, kv_heads, head_dim, generator=gen), dtype, device)
            cos, sin = (t.float() for t in ops.rope_cos_sin(pos, ops.rope_inv_freq(head_dim, base), dtype))
            for layout in (QKV_VIEWS, CONTIGUOUS):
                def run(fn, path_dtype, layout=layout, qkv=qkv, gq_out=gq_out, gk_out=gk_out, cos=cos, sin=sin):
                    (q, k, _), grads = _qkv(qkv, counts, layout, path_dtype)
                    q2, k2 = fn(q, k, _leaf(cos, path_dtype, False), _leaf(sin, path_dtype, False))
                    snaps = {"q": _snapshot(q2), "k": _snapshot(k2)}
                    _backward([q2, k2], [gq_out, gk_out])
                    gq, gk, _ = grads()
                    return snaps, {"grad q": gq, "grad k": gk}
                yield layout, dtype, run
    return _check("rope", candidate, reference, cases(), keeps_dtype=("q", "k"))


# --- RMSNorm, SwiGLU ---------------------------------------------------------------------------

def check_rms_norm(candidate: Callable, reference: Callable = ops.rms_norm_reference, eps: float = 1e-6,
                   dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 3, seq: int = 64,
                   hidden: int = 256) -> List[Comparison]:
    """candidate(x, weight, eps) -> y. Row scales span 1e-2 .. 1e1 (an embedding at init has
    rms ~0.02), so eps visibly matters; the weight is trained (its gradient is compared)."""
    def cases():
        for dtype in dtypes:
            gen = _gen(2)
            scale = 10 ** (torch.rand(batch, seq, 1, generator=gen) * 3 - 2)
            x = _base(torch.randn(batch, seq, hidden, generator=gen) * scale, dtype, device)
            w = _base(torch.rand(hidden, generator=gen) + 0.5, dtype, device)
            gout = _base(torch.randn(batch, seq, hidden, generator=gen), dtype, device)

            def run(fn, path_dtype, x=x, w=w, gout=gout):
                xl, wl = _leaf(x, path_dtype), _leaf(w, path_dtype)
                y = fn(xl, wl, eps)
                snap = _snapshot(y)
                _backward([y], [gout])
                return {"y": snap}, {"grad x": xl.grad, "grad weight": wl.grad}
            yield "residual stream", dtype, run
    return _check("rms_norm", candidate, reference, cases(), keeps_dtype=("y",))


def check_swiglu(candidate: Callable, reference: Callable = ops.swiglu_reference,
                 dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 3, seq: int = 64,
                 ffn: int = 128) -> List[Comparison]:
    """candidate(gate_up [.., 2 ffn]) -> silu(gate) * up, gate the first half (the fused
    gate/up projection's output)."""
    def cases():
        for dtype in dtypes:
            gen = _gen(3)
            gate_up = _base(torch.randn(batch, seq, 2 * ffn, generator=gen) * 2, dtype, device)
            gout = _base(torch.randn(batch, seq, ffn, generator=gen), dtype, device)

            def run(fn, path_dtype, gate_up=gate_up, gout=gout):
                leaf = _leaf(gate_up, path_dtype)
                y = fn(leaf)
                snap = _snapshot(y)
                _backward([y], [gout])
                return {"y": snap}, {"grad gate_up": leaf.grad}
            yield "gate/up projection", dtype, run
    return _check("swiglu", candidate, reference, cases(), keeps_dtype=("y",))


# --- cross-entropy -----------------------------------------------------------------------------

def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-position loss in float32, 0 where target == ignore_index."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, reduction="none")
    return flat.view(target.shape)


def lm_head_loss_reference(hidden, weight, target, loss_weights, vocab_size: int, ignore_index: int = -100):
    """(sum_i w_i * CE_i, per-position CE) with all logits in float32; weight rows from
    vocab_size on are padding, outside the softmax."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    padding = torch.arange(weight.shape[0], device=logits.device) >= vocab_size
    losses = F.cross_entropy(logits.masked_fill(padding, float("-inf")), target.reshape(-1),
                             ignore_index=ignore_index, reduction="none")
    return (losses * loss_weights.reshape(-1).float()).sum(), losses.view(target.shape)


def _targets(gen, shape, vocab: int, argmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token ids skewed as text is (a few ids carry most positions, so per-id gradients add up
    coherently), every 8th ignored (-100); with argmax, a quarter of the positions are the
    model's top prediction (confident, low-loss rows)."""
    zipf = 1.0 / torch.arange(1, vocab + 1).float()
    target = torch.multinomial(zipf, torch.Size(shape).numel(), True, generator=gen).view(shape)
    if argmax is not None:
        pick = torch.rand(shape, generator=gen) < 0.25
        target = torch.where(pick, argmax, target)
    flat = target.reshape(-1)
    flat[3::8] = -100
    return target


def check_cross_entropy(candidate: Callable, reference: Callable = cross_entropy_reference,
                        dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 2, seq: int = 64,
                        vocab: int = 1000) -> List[Comparison]:
    """candidate(logits [b, s, V], target [b, s]) -> per-position loss [b, s] (0 where ignored).
    Logits of varied sharpness, one row shifted by +100 (stability), per-position output
    gradients (a kernel that scales every row by one number fails)."""
    def cases():
        for dtype in dtypes:
            gen = _gen(4)
            sharp = torch.rand(batch, seq, 1, generator=gen) * 6 + 0.5
            logits = torch.randn(batch, seq, vocab, generator=gen) * sharp
            logits[0, 1] += 100.0
            logits = _base(logits, dtype, device)
            target = _targets(gen, (batch, seq), vocab, logits.argmax(-1).cpu()).to(device)
            gout = _base(torch.rand(batch, seq, generator=gen) + 0.1, FP32, device)

            def run(fn, path_dtype, logits=logits, target=target, gout=gout):
                leaf = _leaf(logits, path_dtype)
                loss = fn(leaf, target.clone())
                snap = _snapshot(loss)
                _backward([loss], [gout])
                return {"loss": snap}, {"grad logits": leaf.grad}
            yield "whole vocabulary", dtype, run
    return _check("cross_entropy", candidate, reference, cases())


def check_lm_head_loss(candidate: Callable, reference: Callable = lm_head_loss_reference,
                       dtypes: Sequence[torch.dtype] = (FP32, BF16), device="cpu", batch: int = 8, seq: int = 256,
                       hidden: int = 64, vocab_size: int = 300, padded_vocab: int = 320) -> List[Comparison]:
    """candidate(hidden [b, s, h], weight [V_pad, h], target [b, s], loss_weights [b, s] fp32,
    vocab_size=) -> (sum_i w_i * CE_i, per-position CE): the chunked LM-head loss training
    takes. Head trainable and frozen (no gradient for it then); backward from a scalar != 1.
    The candidate picks its chunk size: a head gradient accumulated in bf16 shows over many
    chunks (~1000 at 2 tokens each, the default 2048 tokens; about 3x past the tolerance)."""
    def cases():
        for dtype in dtypes:
            gen = _gen(5)
            # Post-norm hidden states share a direction (a mean component), as real ones do:
            # per-token head gradients then add up instead of cancelling.
            h = torch.randn(batch, seq, hidden, generator=gen) + torch.randn(hidden, generator=gen)
            h = _base(h, dtype, device)
            w = _base(torch.randn(padded_vocab, hidden, generator=gen) * 0.2, dtype, device)
            target = _targets(gen, (batch, seq), vocab_size).to(device)
            counted = (target != -100).sum()
            lw = ((torch.rand(batch, seq, generator=gen) + 0.5).to(device) / counted).float()
            for head in ("trainable head", "frozen head"):
                def run(fn, path_dtype, h=h, w=w, target=target, lw=lw, head=head):
                    hl, wl = _leaf(h, path_dtype), _leaf(w, path_dtype, head == "trainable head")
                    total, losses = fn(hl, wl, target.clone(), lw.clone(), vocab_size=vocab_size)
                    snaps = {"total": _snapshot(total), "losses": _snapshot(losses)}
                    total.backward(torch.full_like(total, 0.5))
                    return snaps, {"grad hidden": hl.grad, "grad weight": wl.grad}
                yield head, dtype, run
    return _check("lm_head_loss", candidate, reference, cases())

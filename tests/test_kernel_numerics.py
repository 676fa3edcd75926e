"""Numerics of the loss path and RoPE that the GPU run depends on, checked on CPU: RoPE's
frequencies survive any cast of the model, a frozen LM head gets no gradient at all, and the
trainable [IMG]/[/IMG] rows of a frozen head train without the head being copied, and the
weight gradient is summed over chunks in fp32. (tests/test_kernel_parity.py also runs the
chunked loss against its reference, and a bf16-summing stand-in that must fail.)"""

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_vl import ops
from megatron_vl.config import ModelConfig
from megatron_vl.model.llama import LlamaModel
from megatron_vl.model.lora import TrainableRowsOutput
from megatron_vl.parallel.cross_entropy import fused_lm_head_loss
from megatron_vl.parallel.layers import ColumnParallelLinear


def _tiny_llama():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=96,
                      seq_length=32, max_position_embeddings=4096, rotary_base=500000.0)
    return LlamaModel(cfg), cfg


@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_bf16"])
def test_rope_frequencies_stay_exact_under_a_cast_of_the_model(cast):
    """DeepSpeed casts the module (module.bfloat16()); the frequencies must not be rounded."""
    model, cfg = _tiny_llama()
    exact = ops.rope_inv_freq(cfg.head_dim, cfg.rotary_base)
    model = model.to(torch.bfloat16) if cast == "to_bf16" else getattr(model, cast)()
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, exact)
    positions = torch.arange(4000).unsqueeze(0)
    cos, sin = ops.rope_cos_sin(positions, model.rotary.inv_freq)
    ref_cos, ref_sin = ops.rope_cos_sin(positions, exact)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # What a rounded copy would have given: far off at long range (so the check above can fail).
    rounded, _ = ops.rope_cos_sin(positions, exact.to(torch.bfloat16))
    assert (rounded - ref_cos).abs().max() > 0.1


def test_rope_frequencies_follow_the_model_between_devices():
    model, _ = _tiny_llama()
    model.to("meta")
    assert model.rotary.inv_freq.device.type == "meta"
    model.to_empty(device="cpu")
    model.bfloat16()
    assert model.rotary.inv_freq.device.type == "cpu" and model.rotary.inv_freq.dtype == torch.float32


def _loss_inputs(n=40, hidden=16, vocab=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g) * 0.1
    target = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.full((n,), 1.0 / n)
    return h, w, target, weights


def test_a_frozen_head_gets_no_weight_gradient_at_all():
    h, w, target, weights = _loss_inputs()
    total, _ = fused_lm_head_loss(h, w, target, weights, chunk_size=7)
    grad_hidden, grad_weight, grad_delta = total.grad_fn.saved_tensors
    assert grad_weight is None and grad_delta is None   # nothing allocated for it
    total.backward()
    assert w.grad is None and h.grad is not None
    ref = torch.nn.functional.cross_entropy(h.detach().requires_grad_() @ w.t(), target)
    assert torch.allclose(total, ref, atol=1e-6)


def test_trainable_rows_of_a_frozen_head_equal_the_effective_weight_without_copying_it():
    torch.manual_seed(1)
    base = ColumnParallelLinear(16, 24)
    base.weight.requires_grad_(False)
    head = TrainableRowsOutput(base, token_ids=[5, 22])
    with torch.no_grad():
        head.rows_delta.normal_(0, 0.5)
    h, _, target, weights = _loss_inputs(vocab=24, seed=2)
    target[:6] = torch.tensor([5, 22, 5, 22, 5, 1])

    weight, rows = head.weight_and_rows()
    assert weight is base.weight                           # the frozen head itself, not a copy
    total, losses = fused_lm_head_loss(h, weight, target, weights, chunk_size=7, rows=rows)
    assert total.grad_fn.saved_tensors[1] is None          # and no gradient for it
    total.backward()
    grad_h, grad_delta = h.grad.clone(), head.rows_delta.grad.clone()

    h.grad = None
    head.rows_delta.grad = None
    effective = head.weight                                # the copy the loss used to read
    ref_total, ref_losses = fused_lm_head_loss(h, effective, target, weights, chunk_size=7)
    ref_total.backward()
    assert torch.allclose(total, ref_total, atol=1e-6) and torch.allclose(losses, ref_losses, atol=1e-6)
    assert torch.allclose(grad_h, h.grad, atol=1e-6)
    assert torch.allclose(grad_delta, head.rows_delta.grad, atol=1e-6)
    assert grad_delta.abs().sum() > 0 and base.weight.grad is None


def test_the_model_hands_the_loss_the_frozen_head_and_its_rows(monkeypatch):
    import megatron_vl.model.llama as llama
    model, cfg = _tiny_llama()
    model.requires_grad_(False)
    model.head.output = TrainableRowsOutput(model.head.output, token_ids=[3, 90])
    seen = {}

    def spy(hidden, weight, labels, loss_weights, group, vocab_size, rows=None):
        seen.update(weight=weight, rows=rows)
        return fused_lm_head_loss(hidden, weight, labels, loss_weights, group, vocab_size, rows=rows)
    monkeypatch.setattr(llama, "fused_lm_head_loss", spy)
    hidden = torch.randn(2, 8, cfg.hidden_size)
    model.head.fused_loss(hidden, torch.randint(0, cfg.vocab_size, (2, 8)), torch.full((2, 8), 1 / 16))
    assert seen["weight"] is model.head.output.base.weight
    assert torch.equal(seen["rows"][0], torch.tensor([3, 90]))


class _FakeCuda:
    """A tensor stand-in that says it is on CUDA: the dispatch only asks is_cuda."""
    is_cuda = True


@pytest.fixture
def broken_kernel(tmp_path, monkeypatch):
    """A module that raises on import the way a flash-attn built for another CUDA does."""
    (tmp_path / "broken_kernel_mod.py").write_text(
        "raise OSError('libcudart.so.12: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from megatron_vl.ops import _dispatch
    _dispatch.import_error.cache_clear()
    monkeypatch.setattr(_dispatch, "_said", set())
    yield _dispatch
    _dispatch.import_error.cache_clear()


def test_auto_says_once_why_a_fused_kernel_was_not_used(broken_kernel, capsys):
    for _ in range(3):
        assert broken_kernel.fused_available(_FakeCuda(), "auto", "broken_kernel_mod", "attention") is False
    out = capsys.readouterr().out
    assert out == ("fused kernels: attention uses the torch path: broken_kernel_mod does not import (OSError: "
                   "libcudart.so.12: cannot open shared object file: No such file or directory)\n")


def test_auto_on_cpu_says_nothing(broken_kernel, capsys):
    assert broken_kernel.fused_available(torch.ones(1), "auto", "broken_kernel_mod", "attention") is False
    assert capsys.readouterr().out == ""


def test_require_names_the_import_error(broken_kernel, monkeypatch):
    with pytest.raises(RuntimeError, match=r"^fused kernel required for attention, but broken_kernel_mod does not "
                                           r"import \(OSError: libcudart\.so\.12: cannot open"):
        broken_kernel.fused_available(_FakeCuda(), "require", "broken_kernel_mod", "attention")
    monkeypatch.setitem(broken_kernel.KERNELS, "attention", "broken_kernel_mod")
    with pytest.raises(RuntimeError, match=r"no fused kernel for attention \(broken_kernel_mod: OSError: "
                                           r"libcudart\.so\.12"):
        broken_kernel.check_required("require", "cuda", ops=("attention",))


def test_the_decoder_layers_get_exact_cos_sin_from_a_bf16_model():
    """What the layers receive, at long-range positions, after module.bfloat16()."""
    model, cfg = _tiny_llama()
    model.bfloat16()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda _m, args: seen.update(cos=args[1], sin=args[2]))
    positions = torch.tensor([[0, 1, 1000, 2047, 3000, 4095]])
    model(input_ids=torch.zeros_like(positions), position_ids=positions)
    ref_cos, ref_sin = ops.rope_cos_sin(positions, ops.rope_inv_freq(cfg.head_dim, cfg.rotary_base), torch.bfloat16)
    assert torch.equal(seen["cos"], ref_cos) and torch.equal(seen["sin"], ref_sin)


def test_the_head_gradient_is_summed_over_chunks_in_fp32():
    """1024 chunks of 2 tokens in bf16. Against fp32 math on the same bf16 inputs, the result
    may be off by 1e-2 of its largest entry (the bf16 logits cost about 4e-3 here); a bf16
    running sum of the same per-chunk products is off by about 0.2."""
    n, hidden, vocab = 2048, 32, 48
    g = torch.Generator().manual_seed(0)
    # A shared direction, as post-norm hidden states have: per-token gradients add up.
    h = (torch.randn(n, hidden, generator=g) + torch.randn(hidden, generator=g)).bfloat16()
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).bfloat16()
    target = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.full((n,), 1.0 / n)
    w_leaf = w.clone().requires_grad_()
    total, _ = fused_lm_head_loss(h.clone().requires_grad_(), w_leaf, target, weights, chunk_size=2)
    total.backward()
    assert w_leaf.grad.dtype == torch.bfloat16

    hf, wf = h.float(), w.float().requires_grad_()
    (torch.nn.functional.cross_entropy(hf @ wf.t(), target, reduction="none") * weights).sum().backward()
    ref = wf.grad
    scale = ref.abs().max()
    probs = torch.softmax(hf @ wf.detach().t(), -1)
    probs[torch.arange(n), target] -= 1
    per_token = (probs * weights[:, None]).bfloat16()
    running = torch.zeros(vocab, hidden, dtype=torch.bfloat16)
    for start in range(0, n, 2):
        running.addmm_(per_token[start:start + 2].t(), h[start:start + 2])
    assert (w_leaf.grad.float() - ref).abs().max() <= 1e-2 * scale
    assert (running.float() - ref).abs().max() > 0.1 * scale   # what the check above rules out


class _LargestNewStorage(TorchDispatchMode):
    """The largest storage (bytes) any op creates, backward included: views, in-place and out=
    results reuse an input's storage and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_head_allocates_nothing_head_sized(dtype):
    h, w, target, weights = _loss_inputs(n=16, hidden=32, vocab=512)
    h, w = h.detach().to(dtype).requires_grad_(), w.to(dtype)
    with _LargestNewStorage() as frozen:
        total, _ = fused_lm_head_loss(h, w, target, weights, chunk_size=8)
        total.backward()
    assert w.grad is None and frozen.largest < _nbytes(w)
    w.requires_grad_()
    with _LargestNewStorage() as trained:   # the tracker does see a head gradient
        fused_lm_head_loss(h, w, target, weights, chunk_size=8)[0].backward()
    assert trained.largest >= _nbytes(w)


def _lora_head_model():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=500,
                      seq_length=8, max_position_embeddings=64)
    model = LlamaModel(cfg)
    model.requires_grad_(False)
    model.head.final_norm.weight.requires_grad_(True)   # so the head's input wants a gradient too
    model.head.output = TrainableRowsOutput(model.head.output, token_ids=[3, 498])
    with torch.no_grad():
        model.head.output.rows_delta.normal_(0, 0.5)
    return model, cfg


def test_the_lora_head_is_copied_neither_by_the_loss_nor_by_the_logits():
    model, cfg = _lora_head_model()
    head = model.head.output
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[0, :3] = torch.tensor([3, 498, 3])
    with _LargestNewStorage() as loss_path:
        total, _ = model(input_ids=ids, labels=labels, loss_weights=torch.full((2, 8), 1 / 16))
        total.backward()
    with _LargestNewStorage() as logits_path:
        model(input_ids=ids).float().pow(2).sum().backward()
    head_bytes = _nbytes(head.base.weight)
    assert loss_path.largest < head_bytes and logits_path.largest < head_bytes
    assert head.base.weight.grad is None and head.rows_delta.grad.abs().min() > 0
    with _LargestNewStorage() as copied:        # the effective weight, built whole, is such a copy
        head.weight
    assert copied.largest >= head_bytes

    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    head.rows_delta.grad = None
    out = head(x)
    out.pow(2).sum().backward()
    grads = x.grad.clone(), head.rows_delta.grad.clone()
    x.grad, head.rows_delta.grad = None, None
    ref = torch.nn.functional.linear(x, head.weight)
    ref.pow(2).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(grads[0], x.grad, atol=1e-5) and torch.allclose(grads[1], head.rows_delta.grad, atol=1e-5)

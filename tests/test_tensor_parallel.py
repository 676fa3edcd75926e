"""TP=2 against single-process references, in one shared 2-process gloo spawn."""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_vl.testing.distributed import run_distributed

TOL = 1e-6


def _close(a, b, what, tol=TOL):
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max abs difference {diff:.3e} > {tol:.0e}"


def _check_linear_layers(state):
    from megatron_vl.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             shard_parts)
    rank, g = state.tp_rank, state.tp_group
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)

    # Column-parallel, fused (q, k, v-like parts of different sizes), output gathered.
    for parts, gather in (([24], True), ([16, 8, 8], False)):
        torch.manual_seed(7)
        tp_layer = ColumnParallelLinear(16, sum(parts), tp_group=g, output_sizes=parts, gather_output=gather, bias=True)
        torch.manual_seed(7)
        ref = ColumnParallelLinear(16, sum(parts), output_sizes=parts, bias=True)
        _close(tp_layer.weight, shard_parts(ref.weight.detach(), parts, rank, 2), "column weight init")
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        out, ref_out = tp_layer(xa), ref(xb)
        expect = ref_out if gather else shard_parts(ref_out.detach(), parts, rank, 2, dim=-1)
        _close(out, expect, f"column forward parts={parts}")
        w = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2))
        (out * (w if gather else shard_parts(w, parts, rank, 2, dim=-1))).sum().backward()
        (ref_out * w).sum().backward()
        _close(xa.grad, xb.grad, "column input grad")
        _close(tp_layer.weight.grad, shard_parts(ref.weight.grad, parts, rank, 2), "column weight grad")
        assert tp_layer.weight.tensor_model_parallel is True

    # Row-parallel, with the input split by the layer itself.
    torch.manual_seed(8)
    row = RowParallelLinear(16, 12, tp_group=g, input_is_parallel=False, bias=True)
    torch.manual_seed(8)
    row_ref = RowParallelLinear(16, 12, bias=True)
    with torch.no_grad():
        row.bias.add_(0.5)
        row_ref.bias.add_(0.5)
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, ref_out = row(xa), row_ref(xb)
    _close(out, ref_out, "row forward")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    _close(xa.grad, xb.grad, "row input grad")
    _close(row.weight.grad, shard_parts(row_ref.weight.grad, [16], rank, 2, dim=1), "row weight grad")
    _close(row.bias.grad, row_ref.bias.grad, "row bias grad")

    # Vocab-parallel embedding.
    torch.manual_seed(9)
    emb = VocabParallelEmbedding(32, 16, tp_group=g)
    torch.manual_seed(9)
    emb_ref = VocabParallelEmbedding(32, 16)
    ids = torch.tensor([[0, 15, 16, 31, 3], [31, 17, 2, 16, 15]])
    out, ref_out = emb(ids), emb_ref(ids)
    _close(out, ref_out, "embedding forward")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    _close(emb.weight.grad, shard_parts(emb_ref.weight.grad, [32], rank, 2), "embedding grad")


def _check_cross_entropy(state):
    from megatron_vl.parallel.cross_entropy import vocab_parallel_cross_entropy
    rank, g = state.tp_rank, state.tp_group
    gen = torch.Generator().manual_seed(4)
    padded, real = 16, 13          # columns 13..15 are padding, never predicted
    full = torch.randn(4, 6, padded, generator=gen) * 300.0   # large: exp would overflow unshifted
    target = torch.randint(0, real, (4, 6), generator=gen)
    target[0, :3] = -100
    target[3, 5] = 12
    for smoothing in (0.0, 0.1):
        local = full.chunk(2, dim=-1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, g, vocab_size=real, label_smoothing=smoothing)
        ref_logits = full[..., :real].clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.reshape(-1, real), target.reshape(-1), ignore_index=-100,
                              reduction="none", label_smoothing=smoothing).view(4, 6)
        _close(loss, ref, f"CE loss (label smoothing {smoothing})", tol=1e-4 if smoothing else TOL)
        w = torch.rand(4, 6, generator=gen)
        (loss * w).sum().backward()
        (ref * w).sum().backward()
        full_grad = torch.cat([ref_logits.grad, torch.zeros(4, 6, padded - real)], dim=-1)
        _close(local.grad, full_grad.chunk(2, dim=-1)[rank], f"CE grad (label smoothing {smoothing})")
        assert torch.isfinite(loss).all()
        assert (loss[0, :3] == 0).all() and (local.grad[0, :3] == 0).all()

    # The chunked fused LM head (chunks of 7 over 24 positions: a ragged last chunk).
    from megatron_vl.parallel.cross_entropy import fused_lm_head_loss
    from megatron_vl.parallel.layers import shard_parts
    hidden = (torch.randn(4, 6, 8, generator=gen) * 3).requires_grad_()
    weight = torch.randn(padded, 8, generator=gen)
    local_w = shard_parts(weight, [padded], rank, 2).requires_grad_()
    loss_weights = torch.rand(4, 6, generator=gen)
    total, per_pos = fused_lm_head_loss(hidden, local_w, target, loss_weights, g, vocab_size=real, chunk_size=7)
    (total * 0.5).backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight[:real].clone().requires_grad_()
    ref_per = F.cross_entropy((ref_h @ ref_w.t()).reshape(-1, real), target.reshape(-1), reduction="none").view(4, 6)
    ((ref_per * loss_weights).sum() * 0.5).backward()
    _close(per_pos, ref_per.detach(), "fused head per-position loss", tol=1e-5)
    _close(total, (ref_per * loss_weights).sum(), "fused head weighted total", tol=1e-5)
    _close(hidden.grad, ref_h.grad, "fused head hidden grad", tol=1e-5)
    full_w_grad = torch.cat([ref_w.grad, torch.zeros(padded - real, 8)])
    _close(local_w.grad, shard_parts(full_w_grad, [padded], rank, 2), "fused head weight grad", tol=1e-5)


def _check_llama_against_hf(state):
    from helpers import shifted_labels, tiny_hf_model
    from megatron_vl.checkpoint.names import local_to_global
    from megatron_vl.checkpoint.release import hf_to_shards, shards_to_hf
    from megatron_vl.convert.hf import model_config_from_hf
    from megatron_vl.convert.parity import load_llama
    hf = tiny_hf_model(seed=11)
    cfg = model_config_from_hf(hf.config.to_dict())
    ours = load_llama(cfg, state, hf_to_shards(hf.state_dict(), cfg, 2, 1)[(state.tp_rank, 0)])
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    labels = shifted_labels(ids)
    hf_logits = hf(ids).logits
    ours_logits = ours.full_logits(ours(ids))
    _close(ours_logits, hf_logits, "TP=2 logits vs transformers", tol=1e-5)
    torch.nn.functional.cross_entropy(hf_logits.reshape(-1, cfg.vocab_size), labels.reshape(-1),
                                      reduction="sum").backward()
    ours(ids, labels=labels).sum().backward()
    local = local_to_global({n: p.grad for n, p in ours.named_parameters()}, ours.layer_offset)
    gathered = [None, None]
    dist.all_gather_object(gathered, local, group=state.tp_group)
    grads = shards_to_hf({(r, 0): gathered[r] for r in range(2)}, cfg, 2, 1)
    for name, p in hf.named_parameters():
        _close(grads[name], p.grad, f"TP=2 gradient of {name}", tol=1e-5)


def _check_rng_tracker(state):
    from megatron_vl.parallel.random import seed_everything
    tracker = seed_everything(123, tp_rank=state.tp_rank)
    shared = F.dropout(torch.ones(64), 0.5)
    with tracker.fork():
        own = F.dropout(torch.ones(64), 0.5)
    shared_after = F.dropout(torch.ones(64), 0.5)
    masks = [torch.zeros(3, 64) for _ in range(2)]
    dist.all_gather(masks, torch.stack([shared, own, shared_after]), group=state.tp_group)
    assert torch.equal(masks[0][0], masks[1][0]), "replicated dropout must agree across TP ranks"
    assert torch.equal(masks[0][2], masks[1][2]), "forking must not disturb the default stream"
    assert not torch.equal(masks[0][1], masks[1][1]), "per-rank dropout must differ across TP ranks"


def _check_deepspeed_accepts_mpu(state):
    import deepspeed
    from megatron_vl.config import load_config, deepspeed_config
    from megatron_vl.model.llama import LlamaModel
    cfg, _ = load_config(["--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--zero-stage", "1",
                          "--num-layers", "2", "--vocab-size", "300"])
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 2),
                                      mpu=state.as_mpu())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(3):
        loss = engine(ids, labels=ids.roll(-1, 1)).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # Replicated parameters must stay identical on both TP ranks after optimizer steps.
    norm = engine.module.layers[0].input_norm.weight.detach()
    both = [torch.zeros_like(norm) for _ in range(2)]
    dist.all_gather(both, norm, group=state.tp_group)
    assert torch.equal(both[0], both[1])
    return losses


def _tp_checks(rank, world):
    from megatron_vl.parallel.state import ParallelState
    state = ParallelState.build(tp=2)
    _check_linear_layers(state)
    _check_cross_entropy(state)
    _check_llama_against_hf(state)
    _check_rng_tracker(state)
    return _check_deepspeed_accepts_mpu(state)


def test_tensor_parallel_two_ranks():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_vl_torch_extensions"))
    losses = run_distributed(_tp_checks, 2, timeout=280)
    assert losses[0] == losses[1]  # both TP ranks computed the same (reduced) loss

"""ZeRO-3 over 2 data-parallel ranks with our mpu: the chunked fused LM head (the training
path, which reads the head weight directly) trains exactly like the plain logits path, also
when every parameter is partitioned (persistence threshold 0) and with the tied head (the
embedding weight read by the loss after the embedding's forward released it). DeepSpeed
fetches a partitioned parameter read as a module attribute outside its owner's forward (its
ZeROOrderedDict), which is what makes the direct read of the head weight safe."""

import os

import torch

from megatron_vl.testing.distributed import run_distributed


def _train(state, fused, steps=4, partition_all=False, tied=False):
    import deepspeed
    from megatron_vl.config import deepspeed_config, load_config
    from megatron_vl.model.llama import LlamaModel
    cfg, _ = load_config(["--zero-stage", "3", "--micro-batch-size", "2", "--vocab-size", "300", "--clip-grad", "0"]
                         + (["--no-untie-embeddings-and-output-weights"] if tied else []))
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, state)
    ds = deepspeed_config(cfg, 2)
    if partition_all:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=ds, mpu=state.as_mpu())
    if partition_all:   # the head really is partitioned outside forward (numel 0 placeholders)
        assert all(p.numel() == 0 for p in model.parameters())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(state.dp_rank))
    labels = ids.roll(-1, 1)
    losses = []
    for _ in range(steps):
        if fused:
            loss, _ = engine(ids, labels=labels, loss_weights=torch.full((2, 16), 1 / 32))
        else:
            loss = engine(ids, labels=labels).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _both(rank, world):
    from megatron_vl.parallel.state import ParallelState
    state = ParallelState.build()
    assert state.dp == 2 and state.tp == 1
    out = [_train(state, fused=True), _train(state, fused=False)]
    for tied in (False, True):
        out += [_train(state, fused=True, partition_all=True, tied=tied),
                _train(state, fused=False, partition_all=True, tied=tied)]
    return out


def test_zero3_fused_head_equals_plain_path():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_vl_torch_extensions"))
    results = run_distributed(_both, 2, timeout=240)
    for runs in results:
        untied, untied_all, tied_all = runs[0:2], runs[2:4], runs[4:6]
        for fused, plain in (untied, untied_all, tied_all):
            assert len(fused) == 4 and max(abs(a - b) for a, b in zip(fused, plain)) <= 1e-5, (fused, plain)
            assert fused[-1] < fused[0]
        # Partitioning everything changes nothing: the same losses as with the head persistent.
        assert max(abs(a - b) for a, b in zip(untied[0], untied_all[0])) <= 1e-5
    assert results[0][0] != results[1][0]   # the two ranks saw different data

"""Our LLaMA (TP=1) against transformers' LlamaForCausalLM: logits and gradients."""

import pytest
import torch
import torch.nn.functional as F

from helpers import shifted_labels, tiny_hf_model
from megatron_vl.checkpoint.names import local_to_global
from megatron_vl.checkpoint.release import hf_to_shards, shards_to_hf
from megatron_vl.convert.hf import model_config_from_hf
from megatron_vl.convert.parity import load_llama
from megatron_vl.parallel.state import ParallelState


def _ours(hf, **cfg_overrides):
    cfg = model_config_from_hf(hf.config.to_dict())
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    return cfg, load_llama(cfg, ParallelState.single(),
                           hf_to_shards(hf.state_dict(), cfg, 1, 1)[(0, 0)])


def _fused_loss_matches(hf, ours, cfg, ids, labels, tol=1e-5):
    """The chunked fused head (training path): weighted mean loss and gradients vs HF."""
    hf.zero_grad()
    ours.zero_grad()
    count = (labels != -100).sum()
    ref = F.cross_entropy(hf(ids).logits.reshape(-1, cfg.vocab_size), labels.reshape(-1)) * 3.0
    ref.backward()
    total, per_token = ours(ids, labels=labels, loss_weights=torch.full(labels.shape, 3.0) / count)
    assert abs(total.item() - ref.item()) <= tol
    assert per_token.shape == labels.shape and not per_token.requires_grad
    total.backward()
    grads = shards_to_hf({(0, 0): local_to_global({n: p.grad for n, p in ours.named_parameters()}, 0)}, cfg, 1, 1)
    for name, p in hf.named_parameters():
        diff = (grads[name] - p.grad).abs().max().item()
        assert diff <= tol, f"fused-head gradient of {name} differs by {diff:.3e}"


def _compare(hf, ours, cfg, seq=40, tol=1e-5):
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(3))
    labels = shifted_labels(ids)
    hf_logits = hf(ids).logits
    ours_local = ours(ids)
    assert ours_local.shape[-1] == cfg.padded_vocab_size(1) > cfg.vocab_size
    logit_diff = (ours.full_logits(ours_local) - hf_logits).abs().max().item()
    assert logit_diff <= tol, f"logits differ by {logit_diff:.3e}"
    F.cross_entropy(hf_logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="sum").backward()
    ours(ids, labels=labels).sum().backward()
    grads = shards_to_hf({(0, 0): local_to_global({n: p.grad for n, p in ours.named_parameters()}, 0)}, cfg, 1, 1)
    for name, p in hf.named_parameters():
        diff = (grads[name] - p.grad).abs().max().item()
        assert diff <= tol, f"gradient of {name} differs by {diff:.3e}"
    _fused_loss_matches(hf, ours, cfg, ids, labels, tol)


def test_llama_matches_transformers_gqa_odd_vocab():
    hf = tiny_hf_model(seed=1)
    cfg, ours = _ours(hf)
    assert cfg.kv_heads == 2 and cfg.num_attention_heads == 4 and cfg.vocab_size % 128
    _compare(hf, ours, cfg)


def test_llama3_rope_scaling_and_theta_match_transformers():
    hf = tiny_hf_model(seed=2, rope_theta=500000.0, max_position_embeddings=256,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cfg, ours = _ours(hf)
    assert cfg.rope_scaling_type == "llama3" and cfg.rotary_base == 500000.0
    _compare(hf, ours, cfg, seq=64)


def test_tied_embeddings_match_transformers():
    hf = tiny_hf_model(seed=3, tie_word_embeddings=True)
    cfg, ours = _ours(hf)
    assert not cfg.untie_embeddings_and_output_weights
    assert not any("head.output" in n for n, _ in ours.named_parameters())
    _compare(hf, ours, cfg)


def test_padding_is_never_predicted():
    hf = tiny_hf_model(seed=4)
    cfg, ours = _ours(hf)
    with torch.no_grad():   # make the padded rows of the head win every argmax if they were live
        ours.head.output.weight[cfg.vocab_size:] = 100.0
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = ours.full_logits(ours(ids))
    assert logits.shape[-1] == cfg.vocab_size
    loss = ours(ids, labels=ids)
    ref = F.cross_entropy(hf(ids).logits.reshape(-1, cfg.vocab_size), ids.reshape(-1), reduction="none")
    assert (loss.reshape(-1) - ref).abs().max().item() <= 1e-5


def test_recompute_gives_identical_gradients():
    hf = tiny_hf_model(seed=5)
    cfg, plain = _ours(hf)
    _, recomputed = _ours(hf)
    recomputed.recompute = True
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (plain, recomputed):
        m.train()
        m(ids, labels=ids).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_recompute_replays_tensor_parallel_dropout():
    """Attention dropout draws from the TP tracker's stream; recomputation must replay it."""
    from megatron_vl.config import ModelConfig
    from megatron_vl.model.llama import LlamaModel
    from megatron_vl.parallel.random import seed_everything
    cfg = ModelConfig(vocab_size=200, attention_dropout=0.3, hidden_dropout=0.2)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = LlamaModel(cfg, rng_tracker=None, recompute=recompute)
        model.rng_tracker = tracker = seed_everything(5)
        for layer in model.layers:
            layer.attention.rng_tracker = tracker
        model.train()
        model(ids, labels=ids).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_document_segments_isolate_attention():
    """With segment ids, each document's logits equal running that document alone, with
    positions restarted (Megatron's --reset-attention-mask / --reset-position-ids)."""
    hf = tiny_hf_model(seed=6)
    cfg, ours = _ours(hf)
    a = torch.randint(0, cfg.vocab_size, (1, 10))
    b = torch.randint(0, cfg.vocab_size, (1, 14))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 10 + [1] * 14])
    positions = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    with torch.no_grad():
        out = ours.full_logits(ours(packed, position_ids=positions, segment_ids=segments))
        alone = torch.cat([ours.full_logits(ours(a)), ours.full_logits(ours(b))], dim=1)
        hf_alone = torch.cat([hf(a).logits, hf(b).logits], dim=1)
    assert (out - alone).abs().max().item() <= 1e-5
    assert (out - hf_alone).abs().max().item() <= 1e-5


def test_dropout_trains_and_eval_is_deterministic():
    from megatron_vl.config import ModelConfig
    from megatron_vl.model.llama import LlamaModel
    cfg = ModelConfig(vocab_size=200, hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    m = LlamaModel(cfg)
    ids = torch.randint(0, 200, (2, 12))
    m.train()
    assert not torch.equal(m(ids), m(ids))
    m.eval()
    assert torch.equal(m(ids), m(ids))


def test_tied_with_pipeline_is_refused():
    from megatron_vl.config import ModelConfig
    from megatron_vl.model.llama import LlamaModel
    from megatron_vl.parallel.state import ParallelState
    cfg = ModelConfig(untie_embeddings_and_output_weights=False)
    with pytest.raises(ValueError, match="tied embeddings with pipeline parallelism"):
        LlamaModel(cfg, ParallelState(pp=2))


def test_pipeline_stages_chained_equal_transformers():
    """The two stages of a PP=2 import, run one after the other, equal the HF model."""
    hf = tiny_hf_model(seed=8, num_hidden_layers=4)
    cfg = model_config_from_hf(hf.config.to_dict())
    shards = hf_to_shards(hf.state_dict(), cfg, 1, 2)
    stages = [load_llama(cfg, ParallelState(tp=1, pp=2, dp=1, rank=r), shards[(0, r)]) for r in range(2)]
    assert [len(s.layers) for s in stages] == [2, 2] and stages[1].layer_offset == 2
    assert stages[0].head is None and stages[1].embedding is None
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = stages[1].full_logits(stages[1](hidden_states=stages[0](ids)))
        assert (logits - hf(ids).logits).abs().max().item() <= 1e-5

"""Tiny models and data the tests make themselves (nothing is downloaded)."""

import torch

VOCAB = 1003  # not a multiple of 128: exercises padding


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_hf_model(seed=0, **overrides):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    # Random (not constant) norm weights, so a norm wired to the wrong place shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def shifted_labels(ids, ignore_every=5):
    """Next-token targets with the last position and every `ignore_every`-th ignored."""
    labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)
    labels[:, ::ignore_every] = -100
    return labels


def hf_loss_same_targets(hf_out_logits, labels):
    return torch.nn.functional.cross_entropy(hf_out_logits.reshape(-1, hf_out_logits.shape[-1]).float(),
                                             labels.reshape(-1), ignore_index=-100, reduction="sum")


def require_lmms_eval(reason: str) -> None:
    """Skips the calling test module when lmms-eval is not installed (pip install -e .[lmms];
    tests/run.sh installs it). An lmms-eval that is installed but fails to import (a broken
    protobuf, sentencepiece or torchvision beside it) is an error, never a skip."""
    import importlib.util
    import pytest
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip(reason, allow_module_level=True)
    import lmms_eval  # noqa: F401

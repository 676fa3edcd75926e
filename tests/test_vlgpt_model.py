"""VL-GPT (TP=1) against transformers' LLaMA fed the same input embeddings; the loss rule;
LoRA against peft on the same adapters; what trains under LoRA; AdamW groups and schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_hf_model
from megatron_vl.config import Config, LoraConfig, OptimizerConfig
from megatron_vl.checkpoint.release import hf_to_shards
from megatron_vl.convert.hf import model_config_from_hf
from megatron_vl.model.lora import HF_PROJ, apply_lora
from megatron_vl.model.vlgpt import VLGPTModel, regression_targets, visual_inputs
from megatron_vl.parallel.state import ParallelState
from megatron_vl.checkpoint.names import canonical_name
from megatron_vl.training.build import _load_canonical
from megatron_vl.training.optim import build_optimizer, lr_at, parameter_groups

D, S, IMG, IMG_END = 12, 24, 1001, 1002


def _model(hf, **lora):
    cfg = model_config_from_hf(hf.config.to_dict())
    cfg.visual_embed_dim = D
    torch.manual_seed(5)
    model = VLGPTModel(cfg, ParallelState.single(), visual_loss_weight=0.7)
    names = {n: canonical_name(n, False, 0, cfg.num_layers) for n, _ in model.named_parameters()}
    missing = _load_canonical(model, names, hf_to_shards(hf.state_dict(), cfg, 1, 1)[(0, 0)], "hf")
    assert sorted(missing) == ["embedding.visual_proj.bias", "embedding.visual_proj.weight",
                               "head.regression.bias", "head.regression.weight"]
    with torch.no_grad():   # non-zero biases, so a dropped bias shows up
        model.embedding.visual_proj.bias.uniform_(-0.1, 0.1)
        model.head.regression.bias.uniform_(-0.1, 0.1)
    return cfg, model


def _batch(vocab):
    """Two samples: text, an image block [IMG] v0..v3 [/IMG] in the middle, text."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 1000, (2, S), generator=g)
    visual_mask = torch.zeros(2, S, dtype=torch.bool)
    visual_mask[:, 6:10] = True
    tokens[:, 5], tokens[:, 10] = IMG, IMG_END
    slot = torch.where(visual_mask, 0, -1)
    index = torch.where(visual_mask, torch.arange(S) - 6, -1)
    features = torch.randn(2, 2, 4, D, generator=g).half()
    visual = visual_inputs(features, slot, index)
    assert torch.equal(visual[1, 7], features[1, 0, 1].float()) and not visual[:, :6].any()
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1)
    labels[:, 5:9] = -100                      # outputs at 5..8 predict visual positions 6..9
    regression = torch.zeros(2, S, dtype=torch.bool)
    regression[:, 5:9] = True
    return {"tokens": torch.where(visual_mask, 0, tokens), "visual_embeds": visual, "visual_mask": visual_mask,
            "position_ids": None, "segment_ids": None, "labels": labels,
            "visual_targets": regression_targets(visual), "regression_mask": regression}


def _hf_logits(hf, model, batch):
    emb = hf.model.embed_tokens(batch["tokens"])
    proj = model.embedding.visual_proj(batch["visual_embeds"])
    return hf(inputs_embeds=torch.where(batch["visual_mask"].unsqueeze(-1), proj, emb)).logits


def test_vlgpt_matches_transformers_on_interleaved_input_and_loss_rule():
    hf = tiny_hf_model(seed=2)
    cfg, model = _model(hf)
    batch = _batch(cfg.vocab_size)
    logits, pred = model({k: v for k, v in batch.items() if k != "labels"})
    ref = _hf_logits(hf, model, batch)
    assert (model.full_logits(logits) - ref).abs().max().item() < 1e-5
    total, lm, visual = model(batch)
    ce = F.cross_entropy(ref.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1), ignore_index=-100)
    m = batch["regression_mask"]
    # output at t regresses the embedding at t+1
    mse = ((pred[m] - batch["visual_embeds"][:, 1:][m[:, :-1]]) ** 2).mean()
    assert abs(lm.item() - ce.item()) < 1e-5 and abs(visual.item() - mse.item()) < 1e-6
    assert abs(total.item() - (ce.item() + 0.7 * mse.item())) < 1e-5
    total.backward()
    assert model.embedding.visual_proj.weight.grad.abs().sum() > 0
    assert model.head.regression.weight.grad.abs().sum() > 0


def _copy_adapters_to_peft(model, peft_model):
    sd = peft_model.state_dict()
    with torch.no_grad():
        for name, module in model.named_modules():
            for kind in ("lora_A", "lora_B"):
                table = getattr(module, kind, None)
                if not isinstance(table, torch.nn.ParameterDict):
                    continue
                layer = int(name.split(".")[1])
                for part, p in table.items():
                    key = f"base_model.model.model.layers.{layer}.{HF_PROJ[part]}.{kind}.default.weight"
                    sd[key].copy_(p)
    peft_model.load_state_dict(sd)


def test_lora_matches_peft_and_trains_only_adapters_visual_parts_and_new_rows():
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    hf = tiny_hf_model(seed=3)
    cfg, model = _model(hf)
    lora = LoraConfig(lora_rank=4, lora_alpha=8.0)
    counts = apply_lora(model, lora, [IMG, IMG_END], seed=11, global_name=lambda n: n)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "rows_delta" in name:
                p.normal_(0, 0.05)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [n for n in trainable if "lora" not in n] == [
        "embedding.text.rows_delta", "embedding.visual_proj.bias", "embedding.visual_proj.weight",
        "head.lm.output.rows_delta", "head.regression.bias", "head.regression.weight"]
    assert len([n for n in trainable if "lora" in n]) == 2 * 7 * cfg.num_layers

    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    _copy_adapters_to_peft(model, peft_model)
    with torch.no_grad():   # the new rows' deltas, folded into the HF tables
        base = peft_model.base_model.model
        base.model.embed_tokens.weight[[IMG, IMG_END]] += model.embedding.text.rows_delta
        base.lm_head.weight[[IMG, IMG_END]] += model.head.lm.output.rows_delta
    batch = _batch(cfg.vocab_size)
    logits, _ = model({k: v for k, v in batch.items() if k != "labels"})
    emb = base.model.embed_tokens(batch["tokens"])
    proj = model.embedding.visual_proj(batch["visual_embeds"])
    ref = peft_model(inputs_embeds=torch.where(batch["visual_mask"].unsqueeze(-1), proj, emb)).logits
    assert (model.full_logits(logits) - ref).abs().max().item() < 1e-5

    total, _, _ = model(batch)
    total.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    rows = model.embedding.text.rows_delta.grad
    assert rows[0].abs().sum() > 0 and rows[1].abs().sum() > 0        # [IMG] and [/IMG] are in the input
    optimizer = build_optimizer(model, OptimizerConfig(), zero_stage=1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_unknown_lora_target_is_refused():
    hf = tiny_hf_model(seed=3)
    _, model = _model(hf)
    with pytest.raises(ValueError, match=r"--lora-target-modules: unknown \['qkv'\]"):
        apply_lora(model, LoraConfig(lora_rank=2, lora_target_modules=["q", "qkv"]), [], 0, lambda n: n)


def test_no_weight_decay_on_norms_and_biases():
    hf = tiny_hf_model(seed=3)
    _, model = _model(hf)
    groups = parameter_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all("norm" in n or n.endswith(".bias") for n in plain) and "head.lm.final_norm.weight" in plain
    assert "embedding.visual_proj.bias" in plain and "embedding.visual_proj.weight" in decayed
    assert not any("norm" in n or n.endswith(".bias") for n in decayed)


def test_learning_rate_schedule():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=4, lr_decay_iters=14, lr_decay_style="cosine")
    assert [lr_at(i, cfg, 100) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 100) == 1.0
    assert math.isclose(lr_at(9, cfg, 100), 0.1 + 0.9 * 0.5)     # half-way through the decay
    assert lr_at(14, cfg, 100) == lr_at(50, cfg, 100) == pytest.approx(0.1)
    linear = OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="linear")
    assert lr_at(5, linear, 10) == 0.5
    assert lr_at(3, OptimizerConfig(lr=2.0, lr_decay_style="constant"), 10) == 2.0
    assert Config().optimizer.lr_decay_style == "cosine"


@pytest.mark.parametrize("ck_layout", [(2, 1), (1, 2)])
def test_release_checkpoint_grows_vocabulary_at_the_mean_in_any_layout(tmp_path, ck_layout):
    """An HF LLaMA imported without [IMG]/[/IMG]: a TP=2 run reads its own shards (checkpoint
    at TP=2) or re-shards (checkpoint at PP=2); either way each rank holds its slice of the
    HF weights with two new rows at the mean of the old ones."""
    from megatron_vl.checkpoint.release import save_release_checkpoint
    from megatron_vl.training.build import release_weights
    hf = tiny_hf_model(seed=4)
    ck_cfg = model_config_from_hf(hf.config.to_dict())
    save_release_checkpoint(str(tmp_path / "rel"), hf_to_shards(hf.state_dict(), ck_cfg, *ck_layout), ck_cfg,
                            *ck_layout)
    run = Config()
    run.model = model_config_from_hf(hf.config.to_dict())
    run.model.vocab_size = ck_cfg.vocab_size + 2
    padded = run.model.padded_vocab_size(2)
    sd = hf.state_dict()
    for key, hf_key in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                        ("head.output.weight", "lm_head.weight")):
        old = sd[hf_key]
        expect = torch.cat([old, old.mean(0, keepdim=True).expand(2, -1),
                            old.new_zeros(padded - old.shape[0] - 2, old.shape[1])])
        got = torch.cat([release_weights(str(tmp_path / "rel"), run, ParallelState(tp=2, rank=r, pp=1))[key]
                         for r in range(2)])
        assert got.shape == expect.shape and torch.allclose(got, expect, atol=1e-7), key
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    rank1 = release_weights(str(tmp_path / "rel"), run, ParallelState(tp=2, rank=1))
    assert torch.equal(rank1["layers.1.attention.qkv.weight"][:q.shape[0] // 2], q[q.shape[0] // 2:])

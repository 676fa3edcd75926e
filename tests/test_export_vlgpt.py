"""HF export of whole VL-GPT checkpoints: a TP=2 run and a ZeRO-3 + LoRA run each train two
steps on 2 gloo processes and compute the training model's logits and visual predictions
on a fixed interleaved batch; the export (tools/convert_checkpoint.py export-hf) must give
the same through VLGPTForCausalLM, through LlamaForCausalLM (+ PeftModel for the adapter)
on text, and merged with --merge-lora."""

import json
import os

import pytest
import torch

from megatron_vl.convert.hf import CheckpointError
from megatron_vl.convert.vlgpt_export import export_vlgpt
from megatron_vl.modeling_vlgpt import VLGPTForCausalLM
from megatron_vl.testing.distributed import run_distributed
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, PY, VOCAB, run_script, tiny_args

IMG_ID, IMG_END_ID = VOCAB - 2, VOCAB - 1
SEQ = 48


def fixed_batch():
    """Text, then [IMG] + N visual positions + [/IMG], then text: one document."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB - 2, (2, SEQ), generator=gen)
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    start = 10
    tokens[:, start - 1], tokens[:, start + NUM_IMAGE_TOKENS] = IMG_ID, IMG_END_ID
    mask[:, start:start + NUM_IMAGE_TOKENS] = True
    tokens[mask] = 0
    visual = torch.randn(2, SEQ, EMBED_DIM, generator=gen) * mask.unsqueeze(-1)
    return {"tokens": tokens, "visual_embeds": visual, "visual_mask": mask,
            "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(), "segment_ids": None}


def train_and_reference(rank, world, argv):
    """Trains, saves, then runs the training model (its engine's module) on fixed_batch."""
    from megatron_vl.training.pretrain import pretrain
    trainer = pretrain(argv)
    assert trainer.exit_code == 0
    module = trainer.engine.module.eval()
    with torch.no_grad():
        local, visual = module(fixed_batch())
        logits = module.head.full_logits(local)
    # numpy, not tensors: torch would share them through files the exiting child removes
    return logits[..., :VOCAB].numpy().copy(), visual.numpy().copy()


def _train(vl_data, ckpt, *layout):
    argv = [str(a) for a in tiny_args(vl_data, "--global-batch-size", 4, *layout, "--save", ckpt,
                                      "--save-interval", 2, iters=2)]
    logits, visual = run_distributed(train_and_reference, 2, argv, timeout=240)[0]
    return torch.from_numpy(logits), torch.from_numpy(visual)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def image_tokenizer(vl_data):
    # build_vl_data's tiny CLIP sits beside the data; save an untrained image tokenizer on it.
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    root = os.path.dirname(os.path.dirname(vl_data))
    out = os.path.join(root, "image_tokenizer_for_export")
    if not os.path.isdir(out):
        clip = os.path.join(root, "clip")
        model = ImageTokenizer.from_clip(clip, ImageTokenizerConfig(NUM_IMAGE_TOKENS, EMBED_DIM, 1, 2), 0)
        model.save_pretrained(out, load_image_processor(clip))
    return out


@pytest.mark.timeout(400)
def test_tp2_export_matches_training_model(vl_data, tmp_path, image_tokenizer):
    from transformers import AutoTokenizer, LlamaForCausalLM
    logits, visual = _train(vl_data, tmp_path / "ckpt", "--tensor-model-parallel-size", 2)
    out = tmp_path / "hf"
    run_script([PY, "tools/convert_checkpoint.py", "export-hf", "--load", tmp_path / "ckpt", "--save", out,
                "--image-tokenizer", image_tokenizer])
    batch = fixed_batch()
    model = VLGPTForCausalLM.from_pretrained(str(out))
    assert model.image_tokenizer is not None and model.image_tokenizer.proj.out_features == EMBED_DIM
    with torch.no_grad():
        got = model(batch["tokens"], batch["visual_embeds"], batch["visual_mask"])
    _close(got.logits, logits)
    _close(got.visual_predictions, visual)
    # The language model alone, on text: plain transformers.
    lm = LlamaForCausalLM.from_pretrained(str(out))
    text = batch["tokens"][:, :8]
    with torch.no_grad():
        _close(lm(text).logits, logits[:, :8])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["[IMG]", "[/IMG]"]) == [IMG_ID, IMG_END_ID]
    assert len(tok) == VOCAB
    meta = json.load(open(out / "vlgpt_config.json"))
    assert meta["lora"]["state"] == "none" and meta["source"]["tensor_model_parallel_size"] == 2
    assert not os.path.exists(out / "adapter")
    with pytest.raises(CheckpointError, match="--merge-lora, but the run trained no LoRA adapter"):
        export_vlgpt(str(tmp_path / "ckpt"), str(tmp_path / "merged"), merge_lora=True)
    assert not os.path.exists(tmp_path / "merged")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".merged")]   # no half-written leftovers


@pytest.mark.timeout(400)
def test_zero3_lora_export_adapter_and_merged(vl_data, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    logits, visual = _train(vl_data, tmp_path / "ckpt", "--zero-stage", 3, "--lora-rank", 4)
    batch = fixed_batch()
    text = batch["tokens"][:, :8]

    out = tmp_path / "hf"
    export_vlgpt(str(tmp_path / "ckpt"), str(out), log=lambda m: None)
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    model = VLGPTForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        got = model(batch["tokens"], batch["visual_embeds"], batch["visual_mask"])
    _close(got.logits, logits)
    _close(got.visual_predictions, visual)
    # peft's own loader puts the adapter on plain transformers' model; without it the logits differ.
    base = LlamaForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        plain = base(text).logits
        peft_logits = PeftModel.from_pretrained(base, str(out / "adapter"))(text).logits
    _close(peft_logits, logits[:, :8])
    assert (plain - peft_logits).abs().max() > 1e-4, "the adapter changed nothing: LoRA B never trained?"

    merged = tmp_path / "hf-merged"
    export_vlgpt(str(tmp_path / "ckpt"), str(merged), merge_lora=True, log=lambda m: None)
    assert not os.path.exists(merged / "adapter")
    assert json.load(open(merged / "vlgpt_config.json"))["lora"]["state"] == "merged"
    with torch.no_grad():
        _close(LlamaForCausalLM.from_pretrained(str(merged))(text).logits, logits[:, :8])
        got = VLGPTForCausalLM.from_pretrained(str(merged))(batch["tokens"], batch["visual_embeds"],
                                                           batch["visual_mask"])
    _close(got.logits, logits)
    _close(got.visual_predictions, visual)

"""HF export of whole VL-GPT checkpoints: a TP=2 run and a ZeRO-3 + LoRA run each train two
steps on 2 gloo processes and compute the training model's logits and visual predictions
on a fixed interleaved batch; the export (tools/convert_checkpoint.py export-hf) must give
the same through VLGPTForCausalLM, through LlamaForCausalLM (+ PeftModel for the adapter)
on text, and merged with --merge-lora. PP=2 and TP=2 x PP=2 runs (whose engines give losses,
not logits) must give the same text and visual losses on that batch. tools/generate.py on the export
decodes exactly what a greedy loop over VLGPTForCausalLM does."""

import json
import os

import pytest
import torch

from megatron_vl.checkpoint.layout import CheckpointError
from megatron_vl.convert.vlgpt_export import export_vlgpt
from megatron_vl.model.vlgpt import regression_targets
from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
from megatron_vl.testing.distributed import run_distributed
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, PY, VOCAB, run_script, tiny_args

IMG_ID, IMG_END_ID = VOCAB - 2, VOCAB - 1
SEQ = 128          # the runs' --seq-length: the pipeline engine keeps its first buffer shapes


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
            "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(),
            "segment_ids": torch.zeros(2, SEQ, dtype=torch.long)}   # one document (isolation is on by default)


def labelled(batch):
    """fixed_batch with training targets: output t predicts element t+1."""
    nxt_visual = torch.cat([batch["visual_mask"][:, 1:], torch.zeros_like(batch["visual_mask"][:, :1])], 1)
    labels = torch.cat([batch["tokens"][:, 1:], torch.full_like(batch["tokens"][:, :1], -100)], 1)
    labels[nxt_visual] = -100
    return dict(batch, labels=labels, regression_mask=nxt_visual, visual_targets=regression_targets(batch["visual_embeds"]))


def losses_of(logits, visual_pred, batch):
    """(text CE, visual MSE) as training defines them, from an export's outputs."""
    b = labelled(batch)
    text = b["labels"] != -100
    ce = torch.nn.functional.cross_entropy(logits[text].double(), b["labels"][text])
    mse = (visual_pred.double() - b["visual_targets"].double()).pow(2).mean(-1)[b["regression_mask"]].mean()
    return ce.item(), mse.item()


def train_and_reference(rank, world, argv):
    """Trains and saves, then evaluates the training model on fixed_batch: (text loss, visual
    loss) always, (logits, visual predictions) from a plain module (not a pipeline)."""
    from megatron_vl.training.pipeline_stages import pipeline_inputs
    from megatron_vl.training.pretrain import pretrain
    trainer = pretrain(argv)
    assert trainer.exit_code == 0
    trainer.engine.eval()
    with torch.no_grad():
        if trainer.pipeline:
            trainer.engine.eval_batch(data_iter=iter([pipeline_inputs(labelled(fixed_batch()))] * trainer.gas))
            return tuple(trainer._take_reported().tolist()), None, None
        module = trainer.engine.module
        _, lm, vis = module(labelled(fixed_batch()))
        local, visual = module(fixed_batch())
        logits = module.head.full_logits(local)
    # numpy, not tensors: torch would share them through files the exiting child removes
    return (float(lm), float(vis)), logits[..., :VOCAB].float().numpy().copy(), visual.float().numpy().copy()


def _train(vl_data, ckpt, *layout, world=2):
    argv = [str(a) for a in tiny_args(vl_data, "--global-batch-size", 4, *layout, "--save", ckpt,
                                      "--save-interval", 2, iters=2)]
    # The last rank reports: it holds the pipeline head, and without a pipeline every rank
    # computes the same (gathered) outputs.
    losses, logits, visual = run_distributed(train_and_reference, world, argv, timeout=300)[-1]
    if logits is None:
        return losses, None, None
    return losses, torch.from_numpy(logits), torch.from_numpy(visual)


def _close_losses(got, want):
    assert got == pytest.approx(want, rel=2e-5), f"export (lm, visual) {got} vs training {want}"


def check_interleaved_generation(model):
    """generate() (KV-cached) against full forward passes over its own output: every text
    position is the argmax after its prefix (or the forced [/IMG]), every visual position
    the regression head's prediction; an image left open by the prompt is completed."""
    batch = fixed_batch()
    start = 10                        # [IMG] at 9; the prompt keeps its first 3 visual positions
    prompt = {k: batch[k][:1, :start + 3] for k in ("tokens", "visual_embeds", "visual_mask")}
    # The open image is completed outside the text budget (its N - 3 embeddings and [/IMG]); then
    # 40 text tokens, no new image (max_new_images=0), so the length is exact.
    gen = model.generate(prompt["tokens"], prompt["visual_embeds"], prompt["visual_mask"], max_new_tokens=40,
                         max_new_images=0)
    n = NUM_IMAGE_TOKENS
    assert gen.tokens.shape == (1, start + n + 1 + 40)
    assert gen.visual_mask[0, start + 3:start + n].all() and int(gen.tokens[0, start + n]) == IMG_END_ID
    # Returned whole: the prompt's 3 embeddings, then the generated ones.
    assert gen.images[0].shape == (n, EMBED_DIM)
    assert torch.equal(gen.images[0][:3].float(), prompt["visual_embeds"][0, start:start + 3].float())
    with torch.no_grad():
        full = model(gen.tokens, gen.visual_embeds, gen.visual_mask)
    for p in range(start + 3, gen.tokens.shape[1]):
        if gen.visual_mask[0, p]:
            _close(gen.visual_embeds[0, p], full.visual_predictions[0, p - 1])
        elif p != start + n and not (gen.visual_mask[0, p - 1] and int(gen.tokens[0, p]) == IMG_END_ID):
            assert int(gen.tokens[0, p]) == int(full.logits[0, p - 1].argmax()), p


def greedy(model, ids, steps, banned):
    """Greedy decoding over VLGPTForCausalLM's logits, [IMG]/[/IMG] excluded."""
    ids = ids.clone()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids).logits[0, -1].clone()
        logits[banned] = float("-inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
    return ids


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
    losses, logits, visual = _train(vl_data, tmp_path / "ckpt", "--tensor-model-parallel-size", 2)
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
    _close_losses(losses_of(got.logits, got.visual_predictions, batch), losses)
    # The language model alone, on text: plain transformers.
    lm = LlamaForCausalLM.from_pretrained(str(out))
    text = batch["tokens"][:, :8]
    with torch.no_grad():
        _close(lm(text).logits, logits[:, :8])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["[IMG]", "[/IMG]"]) == [IMG_ID, IMG_END_ID]
    assert len(tok) == VOCAB
    # The export's tokenizer as generation loads it gives the training tokenizer's ids, also for
    # characters the tiny sentencepiece model lacks ("Q", ":", "?"): <unk>, never dropped.
    import sentencepiece
    from megatron_vl.inference.modeling_vlgpt import load_tokenizer
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(os.path.dirname(os.path.dirname(vl_data)), "sample", "tokenizer.model"))
    text = "Question: what is it? Short answer:"
    assert sp.encode(text).count(sp.unk_id()) == 4
    assert load_tokenizer(str(out))(text, add_special_tokens=False).input_ids == sp.encode(text)
    meta = json.load(open(out / "vlgpt_config.json"))
    assert meta["lora"]["state"] == "none" and meta["source"]["tensor_model_parallel_size"] == 2
    assert not os.path.exists(out / "adapter")
    with pytest.raises(CheckpointError, match="--merge-lora, but the run trained no LoRA adapter"):
        export_vlgpt(str(tmp_path / "ckpt"), str(tmp_path / "merged"), merge_lora=True)
    assert not os.path.exists(tmp_path / "merged")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".merged")]   # no half-written leftovers
    # Bad input: clear errors, nothing written.
    with pytest.raises(CheckpointError, match="no 'latest' file: not a training checkpoint"):
        export_vlgpt(str(tmp_path), str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="tokenizer '/moved/tokenizer.model' not found .* --tokenizer-model"):
        export_vlgpt(str(tmp_path / "ckpt"), str(tmp_path / "x"), tokenizer_model="/moved/tokenizer.model")
    with pytest.raises(CheckpointError, match="checkpoint iter_0000009 does not exist \\(have: iter_0000002\\)"):
        export_vlgpt(str(tmp_path / "ckpt"), str(tmp_path / "x"), iteration=9)
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="a training or release checkpoint, not a VL-GPT export: export it first"):
        VLGPTForCausalLM.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.timeout(400)
def test_zero3_lora_export_adapter_and_merged(vl_data, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    losses, logits, visual = _train(vl_data, tmp_path / "ckpt", "--zero-stage", 3, "--lora-rank", 4)
    batch = fixed_batch()

    out = tmp_path / "hf"
    export_vlgpt(str(tmp_path / "ckpt"), str(out), log=lambda m: None)
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    model = VLGPTForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        got = model(batch["tokens"], batch["visual_embeds"], batch["visual_mask"])
    _close(got.logits, logits)
    _close(got.visual_predictions, visual)
    _close_losses(losses_of(got.logits, got.visual_predictions, batch), losses)
    check_interleaved_generation(model)
    # tools/generate.py (transformers + peft) decodes what a greedy loop over our class does.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "The picture shows a red circle"
    prompt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    want = greedy(model, prompt, 8, [IMG_ID, IMG_END_ID])[0, prompt.shape[1]:].tolist()
    if tok.eos_token_id in want:   # the tool stops at the end of sequence
        want = want[:want.index(tok.eos_token_id) + 1]
    shown = run_script([PY, "tools/generate.py", "--hf-dir", out, "--prompt", text, "--no-add-bos",
                        "--max-new-tokens", 8, "--text-only"])
    assert f"  -> {tok.decode(want, skip_special_tokens=True)!r}" in shown
    text = batch["tokens"][:, :8]
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


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tp,world", [(1, 2), (2, 4)], ids=["pp2", "tp2-pp2"])
def test_pipeline_export_matches_training_losses(vl_data, tmp_path, tp, world):
    losses, _, _ = _train(vl_data, tmp_path / "ckpt", "--pipeline-model-parallel-size", 2,
                          "--tensor-model-parallel-size", tp, world=world)
    export_vlgpt(str(tmp_path / "ckpt"), str(tmp_path / "hf"), log=lambda m: None)
    batch = fixed_batch()
    with torch.no_grad():
        got = VLGPTForCausalLM.from_pretrained(str(tmp_path / "hf"))(batch["tokens"], batch["visual_embeds"],
                                                                    batch["visual_mask"])
    _close_losses(losses_of(got.logits, got.visual_predictions, batch), losses)
    assert json.load(open(tmp_path / "hf" / "vlgpt_config.json"))["source"]["pipeline_model_parallel_size"] == 2


@pytest.mark.timeout(400)
def test_zero3_bf16_export_is_bf16_and_matches(vl_data, tmp_path):
    """bf16 ZeRO-3 writes bf16_-prefixed optimizer files; the export reads them and goes out
    in the run's precision. bf16 kernels differ, so the losses agree to bf16 accuracy."""
    from safetensors import safe_open
    losses, _, _ = _train(vl_data, tmp_path / "ckpt", "--zero-stage", 3, "--lora-rank", 4, "--bf16")
    assert any(f.startswith("bf16_zero_pp_rank_") for f in os.listdir(tmp_path / "ckpt" / "iter_0000002"))
    out = tmp_path / "hf"
    export_vlgpt(str(tmp_path / "ckpt"), str(out), log=lambda m: None)
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    for f in ("model.safetensors", "vlgpt_heads.safetensors", "adapter/adapter_model.safetensors"):
        with safe_open(str(out / f), "pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}, f
    batch = fixed_batch()
    with torch.no_grad():
        got = VLGPTForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)(
            batch["tokens"], batch["visual_embeds"], batch["visual_mask"])
    assert losses_of(got.logits.float(), got.visual_predictions.float(), batch) == pytest.approx(losses, rel=2e-2)

"""Stage 2 -> stage 3 on the tiny model: instruction data in the four formats (the sample
corpus's), weights-only start from a stage-2 checkpoint with its LoRA merged (checked
against the HF export's own merge at TP=2), the loss on answers falls, exact resume under
torchrun, export, an answer from the export. Stage 2 and stage 3's straight run share one set
of two processes (tests/rank_jobs.py: one spawn's imports); the resume is torchrun's."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_helpers import run_tool
from megatron_vl.testing.distributed import run_distributed
from megatron_vl.testing.scripts import load_script
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, logged_losses, pretrain_rank, run_script, tiny_args
from rank_jobs import printing

FORMATS = {"llava": ("llava/llava_instruct.json", "llava/images"), "coco-captions": ("coco/dataset_coco.json", "coco"),
           "instructpix2pix": ("instructpix2pix/train-00000.parquet", None),
           "magicbrush": ("magicbrush/train-00000.parquet", None)}


def _stages_rank(rank, world, stage2_argv, stage3_argv):
    """Stage 2 (pretrain_vlgpt.py's job), then stage 3 (finetune_instruct.py's, as its `__main__`
    runs it) in this rank: what each printed."""
    from megatron_vl.training.pretrain import pretrain
    script = load_script("finetune_instruct.py")

    def stage3():
        trainer = pretrain(script.DEFAULTS + stage3_argv, script.__doc__, script.STAGE, script.prepare)
        assert trainer.exit_code == 0, f"exit code {trainer.exit_code}"
    return [printing(lambda: pretrain_rank(rank, world, stage2_argv))[1], printing(stage3)[1]]


@pytest.fixture(scope="module")
def instruct(vl_data, tmp_path_factory):
    """The four instruction datasets (with image features) beside the pretraining data, a
    stage-2 checkpoint trained with LoRA at TP=2, and stage 3 from it (16 steps, checkpoint at
    8): its directory and what its two ranks printed."""
    root = os.path.dirname(os.path.dirname(vl_data))
    sample, out = os.path.join(root, "sample"), tmp_path_factory.mktemp("instruct")
    prefixes = []
    for fmt, (path, images) in FORMATS.items():
        run_tool("tools/preprocess_data.py", "--input-format", fmt, "--input", os.path.join(sample, path),
                 *(["--image-root", os.path.join(sample, images)] if images else []), "--output-prefix",
                 str(out / fmt), "--tokenizer-model", os.path.join(sample, "tokenizer.model"), "--no-progress")
        prefixes.append(str(out / f"{fmt}_text_document"))
    run_tool("tools/extract_image_features.py", "--init-from-clip", os.path.join(root, "clip"), "--num-image-tokens",
             str(NUM_IMAGE_TOKENS), "--embed-dim", str(EMBED_DIM), "--tokenizer-heads", "2", "--data-prefix",
             *prefixes, "--no-progress")
    stage2, stage3 = out / "stage2", out / "stage3"
    stage2_argv = tiny_args(vl_data, "--tensor-model-parallel-size", 2, "--lora-rank", 4, "--save", stage2, iters=3)
    stage3_argv = ft_args(vl_data, prefixes, "--load", stage2, "--save", stage3, "--save-interval", 8, "--lr", "3e-3",
                          iters=16)
    ranks = run_distributed(_stages_rank, 2, [str(a) for a in stage2_argv], [str(a) for a in stage3_argv],
                            timeout=400)
    return SimpleNamespace(prefixes=prefixes, stage2=stage2, stage3=stage3,
                           stage3_printed="".join(printed[1] for printed in ranks))


def _port():
    from megatron_vl.testing.distributed import free_port
    return free_port()


def finetune_in_process(argv, monkeypatch, capsys):
    """finetune_instruct.py's job in this process, one rank, as its `__main__` runs it: (exit
    code, everything printed). A process would cost seconds of imports."""
    from megatron_vl.testing.distributed import one_rank_job
    script = load_script("finetune_instruct.py")
    capsys.readouterr()
    code = one_rank_job(lambda: script.run(script.DEFAULTS + [str(a) for a in argv], script.__doc__, script.STAGE,
                                           script.prepare), monkeypatch.setenv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def blend(prefixes):
    return [x for p, w in zip(prefixes, ("0.4", "0.2", "0.2", "0.2")) for x in (w, p)]


def ft_args(vl_data, prefixes, *extra, iters=6):
    # 256 positions: the sample conversations (Vicuna system prompt included) take 140-180 tokens,
    # and a conversation is never split across samples (at 128 nothing would be trained).
    args = tiny_args(vl_data, "--tensor-model-parallel-size", 2, "--lora-rank", 4, "--lr", "2e-3",
                     "--global-batch-size", 4, "--seq-length", 256, *extra, iters=iters)
    i = args.index("--data-path")
    return args[:i] + ["--data-path", *blend(prefixes)] + args[i + 2:]


@pytest.mark.timeout(600)   # whichever test comes first runs the fixture's two stages
def test_stage2_lora_merges_like_the_hf_export(instruct, tmp_path):
    from megatron_vl.config import load_config
    from megatron_vl.checkpoint.release import hf_to_shards
    from megatron_vl.convert.hf import load_hf_state_dict
    from megatron_vl.checkpoint.merged import merged_rank_weights
    stage2 = instruct.stage2
    run_tool("tools/convert_checkpoint.py", "export-hf", "--load", stage2, "--save", tmp_path / "hf", "--merge-lora")
    cfg, _ = load_config(["--config", str(stage2 / open(stage2 / "latest").read() / "config.yaml")])
    hf = load_hf_state_dict(str(tmp_path / "hf"))
    shards = hf_to_shards({k: v.float() for k, v in hf.items()}, cfg.model, 2, 1)
    for r in range(2):
        ours = merged_rank_weights(str(stage2), cfg, r)
        for name, expected in shards[(r, 0)].items():
            if name == "embedding.word_embeddings.weight" or name == "head.output.weight":
                expected = expected[:ours[name].shape[0]]
                got = ours[name][:expected.shape[0]]
            else:
                got = ours[name]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert not any(".lora_" in k or "rows_delta" in k for k in ours)

    # --finetune at another TP size (stage 2 ran at TP=2, stage 3 builds at TP=1): the builder
    # cuts the merged weights anew; what it loads is the export's whole model.
    from megatron_vl.parallel.state import ParallelState
    from megatron_vl.training import build
    loaded = {}
    load_canonical = build._load_canonical

    def capture(module, names, weights, source):
        loaded.update({name: weights[name] for name in names.values() if name in weights})
        return load_canonical(module, names, weights, source)
    build._load_canonical = capture
    try:
        cfg1, _ = load_config(["--config", str(stage2 / open(stage2 / "latest").read() / "config.yaml"),
                               "--tensor-model-parallel-size", "1", "--load", str(stage2), "--finetune"])
        logs = []
        v = cfg1.model.vocab_size
        build.build_model(cfg1, ParallelState.single(), None, [v - 2, v - 1], log=logs.append)
    finally:
        build._load_canonical = load_canonical
    assert any(f"--finetune: weights of {stage2} (adapters merged, cut from TP 2 to TP 1)" in m for m in logs)
    whole = hf_to_shards({k: v.float() for k, v in hf.items()}, cfg.model, 1, 1)[(0, 0)]
    assert set(whole) <= set(loaded)
    visual = set(loaded) - set(whole)   # not LLaMA's: replicated over TP, taken whole
    assert visual and all(name.startswith(("embedding.visual", "head.regression")) for name in visual), visual
    rank0 = merged_rank_weights(str(stage2), cfg, 0)
    for name in visual:
        torch.testing.assert_close(loaded[name], rank0[name], rtol=0, atol=0, msg=name)
    for name, expected in whole.items():
        rows = min(expected.shape[0], loaded[name].shape[0]) if name in build.VOCAB_TENSORS else None
        torch.testing.assert_close(loaded[name][:rows], expected[:rows], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(600)
def test_finetune_from_stage2_learns_resumes_exactly_and_the_export_answers(vl_data, instruct, tmp_path):
    prefixes, stage2, ckpt, straight = instruct.prefixes, instruct.stage2, instruct.stage3, instruct.stage3_printed
    assert f"--finetune: weights of {stage2} (adapters merged)" in straight
    assert "VL-GPT instruction tuning: world 2 = tp 2 x pp 1 x dp 1" in straight
    lines = logged_losses(straight)
    assert sorted(lines) == list(range(1, 17))
    lm = [float(lines[i][1]) for i in range(1, 17)]
    assert np.mean(lm[-3:]) < 0.9 * np.mean(lm[:3]), lm          # the loss on answers falls
    resumed = run_script(["torchrun", "--nproc_per_node", "2", "--master_port", _port(), "finetune_instruct.py",
                          *ft_args(vl_data, prefixes, "--load", ckpt, "--ckpt-step", 8, "--save", ckpt, "--lr", "3e-3",
                                   iters=16)], timeout=400)
    assert f"loaded checkpoint {ckpt}/iter_0000008 (iteration 8, 32 samples consumed)" in resumed
    assert logged_losses(resumed) == {i: lines[i] for i in range(9, 17)}

    from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
    from megatron_vl.data.conversation import ASSISTANT, USER, Conversation, Turn, encode_pieces, get_template
    from transformers import AutoTokenizer
    run_tool("tools/convert_checkpoint.py", "export-hf", "--load", ckpt, "--save", tmp_path / "hf")
    model = VLGPTForCausalLM.from_pretrained(str(tmp_path / "hf")).float()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    pieces = get_template("vicuna_v1").render(Conversation("q", [Turn(USER, "Name a color."), Turn(ASSISTANT, "")]))
    prompt, _, _ = encode_pieces(pieces[:-1], lambda t: tok(t, add_special_tokens=False).input_ids,
                                 tok.eos_token_id, tok.bos_token_id)
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=8)
    assert gen.tokens.shape[1] > len(prompt)


def test_pretraining_data_and_crossed_conversations_are_refused(vl_data, instruct, monkeypatch, capsys):
    prefixes = instruct.prefixes
    code, out = finetune_in_process(tiny_args(vl_data), monkeypatch, capsys)
    assert code == 2 and f"{vl_data}: not instruction data (no loss mask; format 'mmc4')" in out, out[-3000:]
    code, out = finetune_in_process(ft_args(vl_data, prefixes, "--no-reset-attention-mask",
                                            "--tensor-model-parallel-size", 1), monkeypatch, capsys)
    assert code == 2 and "--no-reset-attention-mask: instruction tuning keeps each conversation to itself" in out, \
        out[-3000:]


def test_no_pack_puts_one_conversation_per_sample(instruct):
    from megatron_vl.data.dataset import PackedDataset
    from megatron_vl.data.packing import PackingConfig
    prefixes = instruct.prefixes
    for pack in (True, False):
        cfg = PackingConfig(seq_length=512, num_image_tokens=NUM_IMAGE_TOKENS, max_images=5, reset_attention_mask=True,
                            pack_documents=pack, embed_dim=EMBED_DIM)
        ds = PackedDataset(prefixes[0], cfg)
        documents = [len(np.unique(ds.sample_in_order(j)["segment_ids"][:ds.sample_in_order(j)["num_positions"]]))
                     for j in range(len(ds))]
        if pack:
            assert max(documents) > 1
        else:
            assert max(documents) == 1 and len(ds) >= ds.text.num_documents

"""Stage 1 end to end on tiny random models in their real formats (CLIP, SD 1.5 in the
diffusers layout, IP-Adapter-Plus in both released layouts) and webdataset shards the tests
write: what trains and what stays frozen, the λ ablations, on-the-fly versus precomputed
targets, exact resume under the deepspeed launcher and torchrun, SIGTERM, bad pairs, the
export, and decoding back to pixels through diffusers."""

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_vl.testing import processes
from megatron_vl.testing.tiny_models import save_tiny_clip, save_tiny_ip_adapter, save_tiny_sd
from pretrain_helpers import PY, ROOT, run_script, script_env
from test_pair_stream import _shard

EMBED, TOKENS = 32, 8      # the tiny VL-GPT's visual width and N (pretrain_helpers), so its gen.images decode
IMAGE_COND, TEXT_COND = (17, 48), (77, 24)   # tiny IP encoder: (32/8)^2 + 1 patches x 48; tiny SD text: 77 x 24


@pytest.fixture(scope="module")
def s1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    save_tiny_clip(str(d / "clip"))
    save_tiny_sd(str(d / "sd"))
    for weight in ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sd15.bin"):
        save_tiny_ip_adapter(str(d / "ip"), str(d / "sd"), weight)
    (d / "shards").mkdir()
    for s in range(4):
        _shard(d / "shards" / f"{s:05d}.tar", f"s{s}", 8, 8 * s,
               bad=[(1, "nocaption"), (2, "cutimage")] if s == 0 else [])
    return SimpleNamespace(root=d, clip=str(d / "clip"), sd=str(d / "sd"), ip=str(d / "ip"),
                           shards=str(d / "shards" / "{00000..00003}.tar"))


def args(s1, *extra, iters=4, weight="ip-adapter-plus_sd15.safetensors"):
    return ["--clip-model", s1.clip, "--sd-model", s1.sd, "--ip-adapter", s1.ip, "--ip-adapter-weight", weight,
            "--train-shards", s1.shards, "--visual-embed-dim", str(EMBED), "--num-image-tokens", str(TOKENS),
            "--tokenizer-heads", "2", "--detokenizer-width", "32", "--detokenizer-heads", "2",
            "--detokenizer-layers", "1", "--micro-batch-size", "2", "--shuffle-buffer", "6", "--log-interval", "1",
            "--lr", "2e-3", "--train-iters", str(iters), *map(str, extra)]


def in_process(argv, monkeypatch):
    """train_tokenizer in this process as a one-rank job; returns the trainer."""
    from megatron_vl.stage1.trainer import train_tokenizer
    from megatron_vl.testing.distributed import one_rank_job
    trainer = one_rank_job(lambda: train_tokenizer([str(a) for a in argv]), monkeypatch.setenv)
    assert trainer.exit_code == 0
    return trainer


def fresh_framework(trainer):
    from megatron_vl.stage1.framework import build_framework
    return build_framework(trainer.cfg.model, trainer.cfg.training.seed)


@pytest.mark.timeout(300)
def test_only_the_trainable_parts_train_and_the_loss_falls(s1, monkeypatch):
    import diffusers
    from transformers import CLIPVisionModel

    def refuse(*a, **kw):
        raise AssertionError("stage-1 training must not load the UNet or the VAE")
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    trainer = in_process(args(s1, "--zero-stage", 0, "--micro-batch-size", 4, iters=12), monkeypatch)
    fw, before = trainer.engine.module, fresh_framework(trainer)

    # Shapes come from the local directories' configs.
    z_v, z_t = fw.detokenizer(torch.randn(3, TOKENS, EMBED))
    assert z_v.shape == (3, *IMAGE_COND) and z_t.shape == (3, *TEXT_COND)
    assert fw.tokenizer(torch.randn(3, 3, 32, 32)).shape == (3, TOKENS, EMBED)
    # The optimizer holds exactly the tokenizer's transformer and the detokenizer.
    in_optimizer = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in fw.named_parameters()}
    assert sorted(names[i] for i in in_optimizer) == sorted(
        n for n in names.values() if not n.startswith("tokenizer.clip."))
    # Only the trained module's own parts are there: the target encoders live outside it.
    assert all(n.startswith(("tokenizer.", "detokenizer.")) for n in names.values())
    # Frozen CLIP: bit-identical to its directory after 12 steps; every trainable tensor moved.
    clip = CLIPVisionModel.from_pretrained(s1.clip).state_dict()
    for k, v in fw.tokenizer.clip.state_dict().items():
        assert torch.equal(v, clip[k]), k
    start = dict(before.named_parameters())
    for n, p in fw.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), start[n].detach()), f"{n} did not train"
    h = trainer.history
    assert len(h) == 12 and all(r["applied"] for r in h)
    for part in ("image", "text"):
        first, last = np.mean([r[part] for r in h[:2]]), np.mean([r[part] for r in h[-2:]])
        assert last < 0.85 * first, (part, first, last)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("off", ["image", "text"])
def test_lambda_ablation_trains_only_the_other_head(s1, monkeypatch, off):
    trainer = in_process(args(s1, f"--lambda-{off}", 0, iters=3), monkeypatch)
    fw, before = trainer.engine.module, fresh_framework(trainer)
    on = "text" if off == "image" else "image"
    for name in ("weight", "bias"):
        assert torch.equal(getattr(getattr(fw.detokenizer, f"{off}_head"), name),
                           getattr(getattr(before.detokenizer, f"{off}_head"), name))
        assert not torch.equal(getattr(getattr(fw.detokenizer, f"{on}_head"), name),
                               getattr(getattr(before.detokenizer, f"{on}_head"), name))
    assert all(r[off] > 0 for r in trainer.history)   # still measured, never trained


def test_both_lambdas_zero_and_missing_directories_are_refused(s1, tmp_path, monkeypatch, capsys):
    from megatron_vl.config import ConfigError, load_config
    from megatron_vl.stage1.config import TokenizerTrainConfig
    from megatron_vl.stage1.trainer import parser
    cfg, _ = load_config(args(s1, "--lambda-image", 0, "--lambda-text", 0), parser=parser(),
                         config_cls=TokenizerTrainConfig)
    with pytest.raises(ConfigError, match="both 0: nothing to train"):
        cfg.validate(1)
    # train_tokenizer.py's run() in this process: its exit code and what it printed
    from megatron_vl.stage1.trainer import run
    from megatron_vl.testing.distributed import one_rank_job
    capsys.readouterr()
    code = one_rank_job(lambda: run([str(a) for a in args(s1, "--sd-model", tmp_path / "nope")]), monkeypatch.setenv)
    out = "".join(capsys.readouterr())
    assert code == 1 and f"error: --sd-model {tmp_path / 'nope'}: no such directory" in out, out[-3000:]


@pytest.mark.timeout(400)
def test_precomputed_targets_give_equal_losses(s1, monkeypatch, tmp_path):
    from data_helpers import run_tool   # in this process: the tool's imports are this one's
    out = run_tool("tools/precompute_tokenizer_targets.py", "--train-shards", s1.shards, "--sd-model", s1.sd,
                   "--ip-adapter", s1.ip, "--targets-dir", tmp_path / "t", "--batch-size", 3, "--no-progress")
    assert "wrote targets of 30 pairs from 4 shard(s)" in out      # 32 pairs less the two bad ones
    assert "skipped (image unreadable): 1" in out and "skipped (pair without caption or image): 1" in out
    again = run_tool("tools/precompute_tokenizer_targets.py", "--train-shards", s1.shards, "--sd-model", s1.sd,
                     "--ip-adapter", s1.ip, "--targets-dir", tmp_path / "t", "--no-progress")
    assert "4 shard(s), 4 already done" in again
    on_the_fly = in_process(args(s1, iters=5), monkeypatch).history
    stored = in_process(args(s1, "--targets-dir", tmp_path / "t", iters=5), monkeypatch).history
    assert [(r["image"], r["text"], r["batch_digest"]) for r in stored] == \
           [(r["image"], r["text"], r["batch_digest"]) for r in on_the_fly]


LINE = r"^iteration\s+(\d+)/\d+ \| consumed samples: (\d+) \| image loss: (\S+) \| text loss: (\S+)"


def logged(out):
    import re
    return {int(m[0]): m[1:] for m in re.findall(LINE, out, re.M)}


@pytest.mark.timeout(600)
def test_two_ranks_deepspeed_and_torchrun_resume_exactly_export_and_extract(s1, tmp_path):
    from megatron_vl.parallel.state import free_port
    ckpt = tmp_path / "ckpt"
    common = args(s1, "--zero-stage", 2, "--save", ckpt, "--save-interval", 3, iters=5)
    straight = run_script(["deepspeed", "--num_gpus", "2", "--master_port", free_port(), "train_tokenizer.py", *common],
                          timeout=400)
    lines = logged(straight)
    assert sorted(lines) == [1, 2, 3, 4, 5] and lines[5][0] == "20"
    assert "stage 1: world 2 (data parallel), ZeRO-2" in straight
    # Shard 0's bad pairs are counted by the rank that reads it, never fatal.
    assert "image unreadable: 1" in straight and "pair without caption or image: 1" in straight
    resumed = run_script(["torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "train_tokenizer.py",
                          *common, "--load", ckpt, "--ckpt-step", 3], timeout=400)
    assert f"loaded checkpoint {ckpt}/iter_0000003 (iteration 3, 12 samples consumed)" in resumed
    assert logged(resumed) == {i: lines[i] for i in (4, 5)}

    # Export -> extract_image_features --image-tokenizer: the features are the tokenizer's own forward.
    export = tmp_path / "export"
    from data_helpers import preprocess, run_tool
    run_tool("tools/export_tokenizer.py", "--load", ckpt, "--save", export)
    assert sorted(os.listdir(export)) == ["image_detokenizer", "image_tokenizer", "stage1_export.json"]
    from megatron_vl.data.indexed import FeatureStore
    from megatron_vl.data.preprocess import sidecar
    from megatron_vl.model.image_tokenizer import ImageTokenizer, load_image_processor
    sample = tmp_path / "sample"
    run_tool("tools/make_sample_data.py", "--output", sample, "--documents", "3", "--pairs", "4")
    preprocess(str(sample), "wds-pairs", str(tmp_path / "data" / "pairs"))
    prefix = str(tmp_path / "data" / "pairs_text_document")
    run_tool("tools/extract_image_features.py", "--image-tokenizer", export / "image_tokenizer",
             "--data-prefix", prefix, "--no-progress")
    tokenizer = ImageTokenizer.from_pretrained(str(export / "image_tokenizer")).eval()
    processor = load_image_processor(str(export / "image_tokenizer"))
    from megatron_vl.data.indexed import IndexedDataset
    from PIL import Image
    import io
    table = IndexedDataset(sidecar(prefix, "table"))
    images = [Image.open(io.BytesIO(table[i].tobytes())).convert("RGB") for i in range(len(table))]
    with torch.no_grad():
        expected = tokenizer(processor(images=images, return_tensors="pt")["pixel_values"])
    store = FeatureStore(sidecar(prefix, "features"))
    got = torch.stack([torch.from_numpy(np.asarray(store[i], dtype=np.float32)) for i in range(len(table))])
    assert got.shape == expected.shape == (4, TOKENS, EMBED)
    torch.testing.assert_close(got, expected.half().float(), rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_sigterm_saves_exits_zero_and_resume_continues(s1, tmp_path, monkeypatch, capsys):
    argv = [PY, "train_tokenizer.py", *args(s1, "--save", tmp_path, iters=500)]
    proc = processes.start_process(argv, cwd=ROOT, capture=True, merge_stderr=True, env=script_env())
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("iteration") and line.split("/")[0].split()[1] == "2":
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    stopped = int(open(tmp_path / "latest").read().split("_")[1])
    assert f"stopping at iteration {stopped} on a termination signal" in out
    assert os.path.isdir(tmp_path / f"iter_{stopped:07d}" / "image_detokenizer")
    # The resume in this process (a process's imports saved): it reads only the checkpoint.
    capsys.readouterr()
    in_process(args(s1, "--load", tmp_path, "--save", tmp_path, "--exit-interval", stopped + 2, iters=500), monkeypatch)
    resumed = capsys.readouterr().out
    assert sorted(logged(resumed)) == [stopped + 1, stopped + 2], resumed[-3000:]

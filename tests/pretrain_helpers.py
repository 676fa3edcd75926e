"""A tiny VL-GPT run on data the tests build themselves (sample corpus -> preprocess ->
features from an untrained image tokenizer on a tiny random CLIP)."""

import os
import re
import subprocess
import sys

from data_helpers import ROOT, make_tiny_clip, preprocess, run_tool

VOCAB = 258          # the sample tokenizer's 256 pieces + [IMG], [/IMG]
EMBED_DIM = 32
NUM_IMAGE_TOKENS = 8


def build_vl_data(root) -> str:
    sample = os.path.join(root, "sample")
    run_tool("tools/make_sample_data.py", "--output", sample, "--documents", "24", "--pairs", "32")
    preprocess(sample, "mmc4", os.path.join(root, "data", "mmc4"))
    clip = make_tiny_clip(os.path.join(root, "clip"))
    prefix = os.path.join(root, "data", "mmc4_text_document")
    run_tool("tools/extract_image_features.py", "--init-from-clip", clip, "--num-image-tokens",
             str(NUM_IMAGE_TOKENS), "--embed-dim", str(EMBED_DIM), "--tokenizer-heads", "2",
             "--data-prefix", prefix, "--no-progress")
    return prefix


def tiny_args(prefix, *extra, iters=4):
    return ["--data-path", prefix, "--split", "80,20,0", "--vocab-size", str(VOCAB),
            "--visual-embed-dim", str(EMBED_DIM), "--num-image-tokens", str(NUM_IMAGE_TOKENS),
            "--seq-length", "128", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2",
            "--num-workers", "0", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2",
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--train-iters", str(iters), *map(str, extra)]


def pretrain_rank(rank, world, argv, perturb_init=False):
    """One rank of a pretraining run (inside testing.distributed.run_distributed); returns
    the per-iteration history from the reporting (last) rank. perturb_init shifts every
    initial weight, so a resumed run only matches if the checkpoint restored them all."""
    if perturb_init:
        import megatron_vl.training.build as build
        original = build.iter_initial_weights
        build.iter_initial_weights = lambda *a, **kw: ((k, v + 0.05) for k, v in original(*a, **kw))
    from megatron_vl.training.pretrain import pretrain
    trainer = pretrain(argv)
    assert trainer.exit_code == 0, f"exit code {trainer.exit_code}"
    return trainer.history if rank == world - 1 else None


def pretrain_in_process(argv, monkeypatch, capsys):
    """pretrain_vlgpt.py's job in this process, one rank (no interpreter start, no imports:
    a process costs ~8 s of them): (exit code, everything printed)."""
    from megatron_vl.testing.distributed import one_rank_job
    from megatron_vl.training import pretrain as pt
    from megatron_vl.training.engine import exit_code
    capsys.readouterr()
    code = one_rank_job(lambda: exit_code(lambda: pt.pretrain([str(a) for a in argv])), monkeypatch.setenv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def pretrain_runs(rank, world, argvs):
    """pretrain_rank for each argv in turn, in one set of processes (one spawn, one import)."""
    return [pretrain_rank(rank, world, argv) for argv in argvs]


def script_env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)


def run_script(cmd, expect=0, timeout=240, **env):
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=script_env(**env))
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{cmd[:4]} exited {proc.returncode}, expected {expect}:\n{out[-4000:]}"
    return out


LINE = re.compile(r"^iteration\s+(\d+)/\d+ \| consumed samples: (\d+) \| lm loss: (\S+) \| visual loss: (\S+)", re.M)


def logged_losses(output):
    """{iteration: (consumed samples, lm loss, visual loss)} from the console lines, exactly
    as printed (9 significant digits: a float32 bit for bit)."""
    return {int(m[0]): (int(m[1]), m[2], m[3]) for m in LINE.findall(output)}


PY = sys.executable

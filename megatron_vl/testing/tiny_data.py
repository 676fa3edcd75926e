"""A tiny VL-GPT corpus and run that tests and benchmarks build themselves (nothing is
downloaded): the sample corpus (tools/make_sample_data.py) -> preprocessing -> features from an
untrained image tokenizer on a tiny random CLIP, and the flags of a 2-layer model that trains on
it in seconds."""

from __future__ import annotations

import os
from typing import List

from .scripts import run_tool

VOCAB = 258          # the sample tokenizer's 256 pieces + [IMG], [/IMG]
EMBED_DIM = 32
NUM_IMAGE_TOKENS = 8

SAMPLE_INPUTS = {"mmc4": ("mmc4/docs_shard_0_v2.jsonl.zip", ["--image-root", "{d}/mmc4/images"]),
                 "obelics": ("obelics/part-00000.parquet", []),
                 "wds-pairs": ("pairs/00000.tar", []),
                 "jsonl-text": ("text.jsonl", [])}
"""Input format -> (its file in a make_sample_data.py folder, the extra flags preprocessing it
needs; {d}: that folder)."""


def preprocess(sample_dir, fmt, out_prefix, *extra, expect=0, process=False) -> str:
    """tools/preprocess_data.py on the `fmt` input of a make_sample_data.py folder, with its
    tokenizer; returns what it printed (run_tool: expect, process)."""
    rel, opts = SAMPLE_INPUTS[fmt]
    return run_tool("tools/preprocess_data.py", "--input-format", fmt, "--input", f"{sample_dir}/{rel}",
                    *[o.format(d=sample_dir) for o in opts], "--output-prefix", str(out_prefix),
                    "--tokenizer-model", f"{sample_dir}/tokenizer.model", "--append-eod", "--no-progress",
                    *extra, expect=expect, process=process)


def build_vl_data(root) -> str:
    """The tiny multimodal corpus under root (sample/, clip/, data/); returns its dataset prefix."""
    from .tiny_models import save_tiny_clip
    sample = os.path.join(root, "sample")
    run_tool("tools/make_sample_data.py", "--output", sample, "--documents", "24", "--pairs", "32")
    preprocess(sample, "mmc4", os.path.join(root, "data", "mmc4"))
    clip = save_tiny_clip(os.path.join(root, "clip"))
    prefix = os.path.join(root, "data", "mmc4_text_document")
    run_tool("tools/extract_image_features.py", "--init-from-clip", clip, "--num-image-tokens",
             str(NUM_IMAGE_TOKENS), "--embed-dim", str(EMBED_DIM), "--tokenizer-heads", "2",
             "--data-prefix", prefix, "--no-progress")
    return prefix


def tiny_args(prefix, *extra, iters=4) -> List:
    """pretrain_vlgpt.py's flags for a 2-layer model on the corpus at prefix, `iters` steps;
    then the extra flags, made str."""
    return ["--data-path", prefix, "--split", "80,20,0", "--vocab-size", str(VOCAB),
            "--visual-embed-dim", str(EMBED_DIM), "--num-image-tokens", str(NUM_IMAGE_TOKENS),
            "--seq-length", "128", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2",
            "--num-workers", "0", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2",
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--train-iters", str(iters), *map(str, extra)]

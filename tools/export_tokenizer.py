"""Export a stage-1 training checkpoint (train_tokenizer.py --save) to its two parts:

    python tools/export_tokenizer.py --load ckpt/stage1 --save out/stage1 [--ckpt-step 10000]

Writes out/stage1/image_tokenizer/ (CLIP tower + our causal transformer + the image processor:
what tools/extract_image_features.py --image-tokenizer and the VL-GPT HF export read) and
out/stage1/image_detokenizer/ (with the names of the SD 1.5 and IP-Adapter-Plus directories it
decodes with: tools/reconstruct_images.py, generation). Atomic: a temporary directory renamed
when complete; --save must be new, empty or a previous stage-1 export.
"""

import argparse
import json
import os
import shutil
import sys

from megatron_vl.checkpoint.layout import (IMAGE_DETOKENIZER_DIR, IMAGE_TOKENIZER_DIR, STAGE1_PARTS, CheckpointError,
                                           read_latest, tag_name)
from megatron_vl.checkpoint.output_dir import atomic_directory
from megatron_vl.errors import run_cli


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="train_tokenizer.py --save directory")
    p.add_argument("--ckpt-step", type=int, help="this iteration's checkpoint instead of the one 'latest' names")
    p.add_argument("--save", required=True, help="output directory")
    return p


def export(load: str, save: str, ckpt_step=None) -> str:
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load)
    if tag is None:
        raise CheckpointError(f"--load {load}: no checkpoint ('latest' missing)")
    src = os.path.join(load, tag)
    if not os.path.isdir(src):
        present = sorted(n for n in os.listdir(load) if n.startswith("iter_")) if os.path.isdir(load) else []
        raise CheckpointError(f"--load {load}: no checkpoint {tag}"
                              + (f" (--ckpt-step {ckpt_step})" if ckpt_step is not None else " ('latest' names it)")
                              + f"; present: {', '.join(present) if present else 'none'}")
    for part in STAGE1_PARTS:
        if not os.path.isdir(os.path.join(src, part)):
            raise CheckpointError(f"{src}: no {part}/ (not a train_tokenizer.py checkpoint?)")
    with atomic_directory(save, "stage1-export", sources=(load,)) as tmp:
        for part in STAGE1_PARTS:
            shutil.copytree(os.path.join(src, part), os.path.join(tmp, part))
        with open(os.path.join(tmp, "stage1_export.json"), "w") as fh:
            json.dump({"format": "megatron-vl-stage1", "checkpoint": os.path.abspath(src)}, fh, indent=2)
    return src


def main(argv=None):
    args = build_parser().parse_args(argv)
    src = export(args.load, args.save, args.ckpt_step)   # CheckpointError: one line from run_cli
    print(f"exported {src} -> {args.save}/{IMAGE_TOKENIZER_DIR}, {args.save}/{IMAGE_DETOKENIZER_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

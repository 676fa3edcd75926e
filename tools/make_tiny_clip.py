"""Write a small random CLIP vision tower (transformers format, with its image processor), to
run feature extraction without downloading CLIP-L/14.

    python tools/make_tiny_clip.py --save out/tiny-clip [--image-size 32 --width 32 --layers 2]
"""

import argparse
import sys

from megatron_vl.atomic import guard_output_files
from megatron_vl.errors import run_cli
from megatron_vl.testing.tiny_models import save_tiny_clip


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", required=True)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --save (refused otherwise)")
    return p


FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("image_size", "width", "layers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    guard_output_files(args.save, FILES, overwrite=args.overwrite, flag="--save")
    save_tiny_clip(args.save, args.image_size, args.width, args.layers)
    print(f"wrote {args.save}: random CLIPVisionModel ({args.layers} layers, width {args.width}, "
          f"{args.image_size}px) + CLIPImageProcessor")


if __name__ == "__main__":
    sys.exit(run_cli(main))

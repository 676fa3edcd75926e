"""Write the random tiny models stage 1 reads, in their real formats, so train_tokenizer.py,
the targets, reconstruction and its evaluation run with no downloads:

    python tools/make_tiny_stage1_models.py --save tiny_models

Writes tiny_models/clip (CLIPVisionModel + processor: stands in for CLIP ViT-L/14),
tiny_models/sd (SD 1.5 layout: unet, vae, scheduler, text_encoder, tokenizer),
tiny_models/ip-adapter (IP-Adapter-Plus weights ip-adapter-plus_sd15.safetensors and
image_encoder/, the ViT-H stand-in) and tiny_models/clip-score (CLIPVisionModelWithProjection
for tools/eval_reconstruction.py).
"""

import argparse
import os
import sys

from megatron_vl.testing.tiny_models import (save_tiny_clip, save_tiny_ip_adapter,
                                             save_tiny_ip_image_encoder, save_tiny_sd)

from megatron_vl.atomic import guard_output_files
from megatron_vl.errors import run_cli

IP_WEIGHT = "ip-adapter-plus_sd15.safetensors"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--ip-adapter-weight", default=IP_WEIGHT,
                   help="file name of the adapter weights: .safetensors (flat) or .bin ({image_proj, ip_adapter})")
    p.add_argument("--overwrite", action="store_true", help="replace clip/, sd/, ip-adapter/ and clip-score/ when "
                   "--save already holds them (refused otherwise)")
    return p


PARTS = ("clip", "sd", "ip-adapter", "clip-score")


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.save
    # Other files in --save are left alone; the folders this writes are never replaced unasked.
    guard_output_files(out, PARTS, overwrite=args.overwrite, flag="--save")
    save_tiny_clip(os.path.join(out, "clip"), args.image_size)
    save_tiny_sd(os.path.join(out, "sd"), args.image_size)
    save_tiny_ip_adapter(os.path.join(out, "ip-adapter"), os.path.join(out, "sd"), args.ip_adapter_weight,
                         args.image_size)
    save_tiny_ip_image_encoder(os.path.join(out, "clip-score"), args.image_size, seed=5)
    print(f"wrote {out}/: clip, sd, ip-adapter ({args.ip_adapter_weight} + image_encoder), clip-score "
          f"(random, {args.image_size}px)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

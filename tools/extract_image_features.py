r"""Run the frozen image tokenizer over a preprocessed dataset's image table and write its
feature store (float16 [N, d] per image): the visual inputs and regression targets of
pretraining. Resumable: shards already written (from the same data) are skipped on a rerun.
An image that does not decode is reported with its table row and document, and the run goes
on: the store records it and training drops that image's block from its document.

    python tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --image-tokenizer ckpt/image_tokenizer --batch-size 256
    # before stage-1 training exists: an untrained tokenizer on a CLIP directory
    python tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --init-from-clip /models/clip-vit-large-patch14 --num-image-tokens 32 --embed-dim 4096 \
        --save-image-tokenizer ckpt/image_tokenizer_untrained
"""

import argparse
import sys

import torch


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", nargs="+", required=True, help="dataset prefixes (…_text_document)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-tokenizer", help="a saved image tokenizer directory")
    src.add_argument("--init-from-clip", help="CLIP vision directory: build an untrained tokenizer on it")
    p.add_argument("--num-image-tokens", type=int, default=32, help="N (with --init-from-clip)")
    p.add_argument("--embed-dim", type=int, default=4096, help="d (with --init-from-clip)")
    p.add_argument("--tokenizer-layers", type=int, default=2, help="causal transformer depth (with --init-from-clip)")
    p.add_argument("--tokenizer-heads", type=int, default=8, help="its attention heads (with --init-from-clip)")
    p.add_argument("--save-image-tokenizer", help="save the tokenizer used here (with --init-from-clip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    from tqdm import tqdm
    from megatron_vl.data.features import extract_features
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("batch_size", "shard_size", "num_image_tokens", "embed_dim", "tokenizer_layers", "tokenizer_heads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive number")
    if args.image_tokenizer:
        model, processor = ImageTokenizer.from_pretrained(args.image_tokenizer), load_image_processor(args.image_tokenizer)
    else:
        cfg = ImageTokenizerConfig(args.num_image_tokens, args.embed_dim, args.tokenizer_layers, args.tokenizer_heads)
        model = ImageTokenizer.from_clip(args.init_from_clip, cfg, args.seed)
        processor = load_image_processor(args.init_from_clip)
        if args.save_image_tokenizer:
            model.save_pretrained(args.save_image_tokenizer, processor)
    model.to(args.device).eval()
    for prefix in args.data_prefix:
        try:
            result = extract_features(prefix, model, processor, args.batch_size, args.shard_size, args.device,
                                      progress=None if args.no_progress else tqdm)
        except (ValueError, OSError) as exc:
            print(f"error: {prefix}: {exc}", file=sys.stderr)
            return 1
        print(f"{prefix}_image_features: {result.count} images x {list(result.shape)} float16")
        if result.undecodable:
            print(f"skipped (image undecodable, its block dropped from training layouts): {len(result.undecodable)}")
            for line in result.undecodable[:20]:
                print(f"  {line}")
            if len(result.undecodable) > 20:
                print(f"  ... and {len(result.undecodable) - 20} more (all recorded in the feature store)")
    return 0


if __name__ == "__main__":
    from megatron_vl.errors import run_cli
    sys.exit(run_cli(main))

"""Evaluate a stage-1 export by reconstruction (the SEED / VL-GPT Table 1 protocol): CLIP
cosine similarity between each original image and its reconstruction, averaged over images
from webdataset shards, per decoding mode.

    python tools/eval_reconstruction.py --export out/stage1 --shards 'coco-val/{00000..00004}.tar' \
        --clip-score-model models/clip-vit-large-patch14 --max-images 5000 --modes both image text \
        --output-json recon_eval.json

--clip-score-model: a local CLIPVisionModelWithProjection directory with its image processor
(the encoder whose image embeddings are compared). Images that do not decode and pairs without
an image are counted and reported.
"""

import argparse
import itertools
import json
import os
import sys

import torch


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="tools/export_tokenizer.py output")
    p.add_argument("--shards", nargs="+", required=True, help="webdataset shard patterns ('val/{00000..00004}.tar')")
    p.add_argument("--clip-score-model", required=True, help="CLIPVisionModelWithProjection directory")
    p.add_argument("--modes", nargs="+", default=["both", "image", "text"], choices=["both", "image", "text"])
    p.add_argument("--max-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sd-model")
    p.add_argument("--ip-adapter")
    p.add_argument("--ip-adapter-weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-json", help="write the scores here too (a rerun replaces this tool's own earlier file; "
                   "any other existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-json this tool did not write")
    p.add_argument("--no-progress", action="store_true")
    return p


SCORES_KIND = "megatron-vl eval_reconstruction"


def _own_scores(path: str) -> bool:
    """Whether `path` is a scores file this tool wrote (a rerun may replace it)."""
    try:
        with open(path) as fh:
            return json.load(fh).get("tool") == SCORES_KIND
    except (OSError, ValueError, AttributeError):
        return False


def main(argv=None):
    from tqdm import tqdm
    from megatron_vl.atomic import atomic_open, guard_output
    from megatron_vl.data.formats import Report
    from megatron_vl.data.pair_stream import PairStream, expand_shards
    from megatron_vl.errors import InputError, UserError
    from megatron_vl.model.image_detokenizer import ImageDetokenizer
    from megatron_vl.model.image_tokenizer import ImageTokenizer, load_image_processor
    from megatron_vl.inference.diffusion_decoder import DiffusionDecoder
    from megatron_vl.stage1.evaluation import ClipImageScorer, evaluate_reconstruction
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("max_images", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    shards = [s for pattern in args.shards for s in expand_shards(pattern)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        print(f"error: {len(missing)} shard(s) do not exist, e.g. {missing[0]}", file=sys.stderr)
        return 2
    if args.output_json:   # a rerun replaces its own scores, never one of the inputs or another file
        guard_output(args.output_json, inputs=shards, overwrite=args.overwrite or _own_scores(args.output_json),
                     flag="--output-json")
    tok_dir, detok_dir = os.path.join(args.export, "image_tokenizer"), os.path.join(args.export, "image_detokenizer")
    try:
        tokenizer = ImageTokenizer.from_pretrained(tok_dir).to(args.device).eval()
        processor = load_image_processor(tok_dir)
        decoder = DiffusionDecoder(ImageDetokenizer.from_pretrained(detok_dir), args.sd_model, args.ip_adapter,
                                   args.ip_adapter_weight, args.device)
        scorer = ClipImageScorer(args.clip_score_model, args.device)
    except UserError:
        raise   # names its file: one line from run_cli
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = Report()
    # One pass over the shards in order (no shuffle, one epoch): the same images every run.
    stream = PairStream([shards], [1.0], shuffle_buffer=1, report=report)
    pairs = itertools.islice(stream.samples(), args.max_images)
    seen = set()

    def first_epoch():
        for pair in pairs:
            if pair.where in seen:   # the stream loops over epochs; stop at the first repeat
                return
            seen.add(pair.where)
            yield pair.image

    def skipped() -> str:
        return "; ".join(f"{reason}: {n}, first at {report.first_seen[reason]}"
                         for reason, n in sorted(report.skipped.items())) or "nothing skipped"

    with tqdm(total=args.max_images, unit="image", disable=args.no_progress) as bar:
        try:
            scores = evaluate_reconstruction(first_epoch(), tokenizer, processor, decoder, scorer, args.modes,
                                             args.batch_size, bar, steps=args.steps,
                                             guidance_scale=args.guidance_scale, seed=args.seed)
        except (InputError, ValueError) as exc:   # the stream's "no readable pair" is a ValueError
            raise InputError(f"--shards {' '.join(args.shards)}: {exc} ({skipped()})") from None
    print(f"{'mode':<8} {'images':>7} {'CLIP similarity':>16}")
    for mode, s in scores.items():
        print(f"{mode:<8} {s['images']:>7} {s['clip_similarity']:>16.4f}")
    for reason, n in sorted(report.skipped.items()):
        print(f"skipped ({reason}): {n}  first at {report.first_seen[reason]}")
    if args.output_json:
        with atomic_open(args.output_json, "w") as fh:
            json.dump({"tool": SCORES_KIND, "scores": scores, "skipped": dict(report.skipped)}, fh, indent=2)
    return 0


if __name__ == "__main__":
    from megatron_vl.errors import run_cli
    sys.exit(run_cli(main))

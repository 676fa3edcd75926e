"""Feature extraction throughput on CPU, in images/s: the tool's path (extract_features: JPEGs
decoded and preprocessed in DataLoader workers while this process runs the image tokenizer's
forward, shards written and merged) against a bare loop of the same forward over the same
batches on pre-decoded tensors. Goal: tool / bare >= 0.90 (decoding and I/O hidden behind the
forward). Also the tool with 1 worker and with 0 (decoding in this process, as before).

torch runs 1 thread, so a machine of 2 cores gives the forward one core and a worker the other.
The model is a small CLIP-like ViT (224 px, patch 32, width 384, 6 layers) plus the tokenizer's
2-layer causal transformer to [32, 1024]: on one core its forward takes a few times as long as
decoding and CLIP-preprocessing a 480x360 JPEG, so one worker can keep up with it. (CLIP-L's
forward on one core is hundreds of decodes; on a GPU the balance turns, and the decoding
workers, several per GPU, are what must keep up.)

    python benchmarks/bench_extract.py [--images 128 --batch-size 8 --workers 1]
    python benchmarks/bench_extract.py --smoke     # same code path, tiny sizes (seconds; the test-suite's check)
"""

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

SMOKE = {"images": 6, "batch_size": 2, "shard_size": 4, "image_size": 32, "patch": 8, "width": 32, "layers": 1,
         "jpeg": 48, "embed_dim": 16, "tokens": 4,
         "repeats": 1}

TOKENIZER = {"type": "bench", "model": "-", "vocab_size": 32002, "eod_id": 2,
             "image_token_ids": {"[IMG]": 32000, "[/IMG]": 32001}}


def _jpeg(rng, width, height):
    """A photo-like JPEG (smooth gradients plus noise, quality 90): decodes like a web image."""
    from PIL import Image
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def build(args, work):
    """(dataset prefix, image tokenizer, CLIP processor)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from megatron_vl.console import clip_image_processor_class
    from megatron_vl.data.formats import Report
    from megatron_vl.data.preprocess import DatasetWriter
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
    prefix = os.path.join(work, "bench_text_document")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(prefix, TOKENIZER, multimodal=True)
    for _ in range(args.images):
        writer.add(rng.integers(3, 32000, 40), [(0, 40, _jpeg(rng, args.jpeg * 4 // 3, args.jpeg))])
    writer.finalize(Report(), {})
    torch.manual_seed(0)
    heads = max(1, args.width // 64)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width,
                                            num_hidden_layers=args.layers, num_attention_heads=heads,
                                            image_size=args.image_size, patch_size=args.patch))
    model = ImageTokenizer(ImageTokenizerConfig(args.tokens, args.embed_dim, 2, heads), clip).eval()
    processor = clip_image_processor_class()(size={"shortest_edge": args.image_size},
                                             crop_size={"height": args.image_size, "width": args.image_size})
    return prefix, model, processor


def decoded_batches(prefix, processor, batch_size, shard_size):
    """The tool's batches as pixel tensors, decoded beforehand; and images/s of decoding and
    preprocessing alone (one core)."""
    from megatron_vl.data.extraction import DecodedBatches, shard_ranges
    from megatron_vl.data.preprocess import sidecar
    from megatron_vl.data.indexed import IndexedDataset
    total = len(IndexedDataset(sidecar(prefix, "table")))
    batches = [(b, min(b + batch_size, e)) for s, e in shard_ranges(total, shard_size) for b in range(s, e, batch_size)]
    decoder = DecodedBatches(sidecar(prefix, "table"), processor, batches)
    t0 = time.perf_counter()
    pixels = [decoder[i][0] for i in range(len(batches))]
    return pixels, total / (time.perf_counter() - t0)


def bare_forward(model, pixels):
    """images/s of the forward alone, the tool's own call, over pre-decoded batches."""
    from megatron_vl.data.extraction import _forward
    t0 = time.perf_counter()
    for px in pixels:
        _forward(model, px, "cpu", None)
    return sum(len(px) for px in pixels) / (time.perf_counter() - t0)


def tool_path(prefix, model, processor, batch_size, shard_size, workers):
    from megatron_vl.data.features import extract_features
    t0 = time.perf_counter()
    result = extract_features(prefix, model, processor, batch_size, shard_size, "cpu", workers=workers)
    return result.count / (time.perf_counter() - t0), result.forward_share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="decoding workers of the tool's main figure")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=32, help="N")
    p.add_argument("--embed-dim", type=int, default=1024, help="d")
    p.add_argument("--jpeg", type=int, default=360, help="JPEG height in pixels (width 4/3 of it)")
    p.add_argument("--repeats", type=int, default=5,
                   help="measurements of each, interleaved; the best is shown (the machine may be shared)")
    p.add_argument("--workdir", default=None)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    torch.set_num_threads(1)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_extract_")
    os.makedirs(work, exist_ok=True)
    try:
        prefix, model, processor = build(args, work)
        pixels, decode = decoded_batches(prefix, processor, args.batch_size, args.shard_size)
        bare_forward(model, pixels[:1])   # first-call set-up out of the timing
        counts = [args.workers] + [w for w in (1, 0) if w != args.workers]
        bare, tool = 0.0, dict.fromkeys(counts, (0.0, 0.0))
        for _ in range(args.repeats):
            bare = max(bare, bare_forward(model, pixels))
            for workers in counts:
                tool[workers] = max(tool[workers], tool_path(prefix, model, processor, args.batch_size,
                                                             args.shard_size, workers))
        print(f"{args.images} JPEGs {args.jpeg * 4 // 3}x{args.jpeg} -> CLIP-like ViT {args.image_size} px, patch "
              f"{args.patch}, width {args.width}, {args.layers} layers -> [{args.tokens}, {args.embed_dim}]; batch "
              f"{args.batch_size}, shards of {args.shard_size}; torch 1 thread, {os.cpu_count()} cores; best of "
              f"{args.repeats}")
        print(f"decode + preprocess alone: {decode:.2f} images/s on one core ({1000 / decode:.1f} ms per image)")
        print(f"bare forward on pre-decoded tensors: {bare:.2f} images/s ({1000 / bare:.1f} ms per image)")
        for workers, (rate, busy) in tool.items():
            what = "decoding in the main process" if workers == 0 else f"{workers} worker{'s' if workers > 1 else ''}"
            goal = " (goal >= 0.90)" if workers == args.workers else ""
            print(f"tool path, {what}: {rate:.2f} images/s = {rate / bare:.3f} of the bare forward{goal}; "
                  f"the forward busy {busy:.1%} of its loop")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

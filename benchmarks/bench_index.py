"""Sample-index build speed at the paper's scale: 82M packed samples (20,000 iterations x
global batch 4096) of 512 positions over an MMC4-like corpus (log-normal text, ~417 tokens
and ~5.7 images per document, as MMC4's 43B tokens / 585M images / 103M documents), one
core. Goals: >= 5M samples/s for the compiled builder; 82M samples in <= 60 s with the
document order (numpy's per-epoch permutation, timed apart: it is the same for both builders).

The reference (``packing.build_sample_starts``, the pure-Python loop used before) is timed on
a prefix in the same run, and the new builder's rows are checked equal to it there.

    python benchmarks/bench_index.py [--documents 2000000 --samples 82000000 --reference-samples 200000]
    python benchmarks/bench_index.py --smoke     # same code path, tiny sizes (seconds; the test-suite's check)
"""

import argparse
import time

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

import numpy as np

from megatron_vl.data.packing import PackingConfig, build_sample_starts
from megatron_vl.data.sample_index import SampleIndexBuilder, SpanTable, build_sample_starts_fast


SMOKE = {"documents": 2000, "samples": 20_000, "reference_samples": 500}


def mmc4_like(documents: int, seed: int = 0):
    """(tokens per document, SpanTable): images attached to random sentence spans."""
    rng = np.random.default_rng(seed)
    tokens = np.maximum(8, rng.lognormal(np.log(330), 0.7, documents)).astype(np.int64)   # mean ~417
    images = np.minimum(rng.poisson(5.7, documents), 30)
    total = int(images.sum())
    doc_of = np.repeat(np.arange(documents), images)
    n = tokens[doc_of]
    start = (rng.random(total) * n).astype(np.int64)
    end = np.minimum(n, start + rng.integers(5, 40, total))
    triples = np.stack([start, end, np.arange(total)], 1)
    return tokens, SpanTable.from_triples(triples, images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=2_000_000, help="corpus size; epochs repeat it")
    p.add_argument("--samples", type=int, default=82_000_000)
    p.add_argument("--reference-samples", type=int, default=200_000, help="prefix the reference builds")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--num-image-tokens", type=int, default=32)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    cfg = PackingConfig(seq_length=args.seq_length, num_image_tokens=args.num_image_tokens, max_images=5, seed=1234)
    tokens, spans = mmc4_like(args.documents)
    print(f"corpus: {args.documents:,} documents, {int(tokens.sum()):,} tokens, {len(spans.pairs):,} images; "
          f"seq {cfg.seq_length}, N = {cfg.num_image_tokens}, <= {cfg.max_images} images per sample")

    # Warm the compiled kernel (numba caches it on disk; the first run of a checkout compiles).
    t = time.perf_counter()
    build_sample_starts_fast(np.arange(10), tokens, spans, cfg, 5)
    print(f"kernel load/compile: {time.perf_counter() - t:.2f} s")

    rng = np.random.RandomState(cfg.seed)
    first_epoch = rng.permutation(args.documents)
    t = time.perf_counter()
    ref = build_sample_starts(first_epoch, tokens, lambda d: np.stack(
        [spans.pairs[spans.lo[d]:spans.hi[d], 0], spans.pairs[spans.lo[d]:spans.hi[d], 1],
         np.arange(spans.lo[d], spans.hi[d])], 1).reshape(-1), cfg, args.reference_samples)
    ref_time = time.perf_counter() - t
    ref_rate = (len(ref) - 1) / ref_time
    fast = build_sample_starts_fast(first_epoch, tokens, spans, cfg, args.reference_samples)
    assert np.array_equal(ref, fast), "compiled builder differs from the reference"
    print(f"reference (pure Python): {len(ref) - 1:,} samples in {ref_time:.2f} s = {ref_rate / 1e6:.3f} M samples/s "
          f"(identical rows from the compiled builder)")

    # The full index as the dataset builds it: a fresh document order per epoch (numpy's
    # permutation, the same for both builders: timed apart), each epoch extending the rows
    # of the ones before.
    rng = np.random.RandomState(cfg.seed)
    builder = SampleIndexBuilder(tokens, spans, cfg)
    order_time = build_time = 0.0
    epochs = 0
    while not builder.finished:
        t = time.perf_counter()
        order = rng.permutation(args.documents)
        order_time += time.perf_counter() - t
        t = time.perf_counter()
        builder.extend(order, args.samples + 1)
        build_time += time.perf_counter() - t
        epochs += 1
    rate = args.samples / build_time
    print(f"compiled: {args.samples:,} samples ({epochs} epochs) in {build_time:.1f} s = {rate / 1e6:.2f} M samples/s, "
          f"{rate / ref_rate:.0f}x the reference (which would take {args.samples / ref_rate / 60:.0f} min)")
    print(f"with the document order: {order_time + build_time:.1f} s for {args.samples:,} samples (goal <= 60 s)")


if __name__ == "__main__":
    main()

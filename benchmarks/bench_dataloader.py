"""Packed samples per second from one process: 5 images per sample, [32, 4096] float16
features, seq 512, warm page cache (goal >= 1,000 samples/s; a 32xA100 run needs ~27 per GPU).

    python benchmarks/bench_dataloader.py [--images 600 --samples 2000 --workdir /tmp/bench_dl]
    python benchmarks/bench_dataloader.py --smoke     # same code path, tiny sizes (seconds; the test-suite's check)
"""

import argparse
import os
import shutil
import tempfile
import time

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

import numpy as np

from megatron_vl.data.dataset import PackedDataset
from megatron_vl.data.formats import Report
from megatron_vl.data.indexed import FeatureStoreWriter
from megatron_vl.data.packing import PackingConfig
from megatron_vl.data.preprocess import DatasetWriter, table_fingerprint

SMOKE = {"images": 20, "samples": 30}

TOKENIZER = {"type": "bench", "model": "-", "vocab_size": 32002, "eod_id": 2,
             "image_token_ids": {"[IMG]": 32000, "[/IMG]": 32001}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="images (= documents, one each) in the dataset")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--workdir", default=None)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_dl_")
    os.makedirs(work, exist_ok=True)
    prefix = os.path.join(work, "bench_text_document")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(prefix, TOKENIZER, multimodal=True)
    for _ in range(args.images):      # 60 text tokens + a 34-position image block: 5 blocks fill 470 of 512
        tokens = rng.integers(3, 32000, 60)
        writer.add(tokens, [(10, 20, b"")])
    writer.finalize(Report(), {})
    feats = FeatureStoreWriter(prefix + "_image_features", 32, 4096, source=table_fingerprint(prefix))
    for _ in range(args.images):
        feats.add(rng.standard_normal((32, 4096)).astype(np.float16))
    feats.finalize()
    cfg = PackingConfig(seq_length=512, num_image_tokens=32, max_images=5, seed=0)
    ds = PackedDataset(prefix, cfg, num_samples=args.samples, cache_dir=work)
    for i in range(len(ds)):          # warm the page cache (and check the shape of the workload)
        ds[i]
    images = np.mean([ds[i]["num_images"] for i in range(min(200, len(ds)))])
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    elapsed = time.perf_counter() - t0
    print(f"{len(ds)} packed samples (seq 512, {images:.2f} images/sample, features [32, 4096] float16) "
          f"in {elapsed:.2f} s: {len(ds) / elapsed:,.0f} samples/s from one process (goal >= 1,000)")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""MMC4-format preprocessing throughput (documents/s, and per worker) with 1 and 2 workers,
on sample data drawn by tools/make_sample_data.py (real jpeg files, zip shard, validity check
of every image, sentencepiece tokenization).

    python benchmarks/bench_preprocess.py [--documents 2000]
    python benchmarks/bench_preprocess.py --smoke     # same code path, tiny sizes (seconds; the test-suite's check)
"""

import argparse
import os
import shutil
import tempfile
import time

from megatron_vl.data.preprocess import preprocess_files
from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke
from megatron_vl.testing.scripts import load_script


SMOKE = {"documents": 20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    make_sample_data = load_script("tools/make_sample_data.py")
    work = tempfile.mkdtemp(prefix="bench_pre_")
    try:
        make_sample_data.main(["--output", work, "--documents", str(args.documents), "--pairs", "1"])
        shard = os.path.join(work, "mmc4", "docs_shard_0_v2.jsonl.zip")
        for workers in args.workers:
            t0 = time.perf_counter()
            report = preprocess_files([shard], os.path.join(work, f"out{workers}"), "mmc4", "sentencepiece",
                                      os.path.join(work, "tokenizer.model"), image_root=os.path.join(work, "mmc4", "images"),
                                      append_eod=True, workers=workers, progress=False)
            elapsed = time.perf_counter() - t0
            rate = report.documents_written / elapsed
            print(f"{workers} worker(s): {report.documents_written} MMC4 documents, {report.images_placed} images in "
                  f"{elapsed:.2f} s: {rate:,.0f} docs/s ({rate / workers:,.0f} per worker)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

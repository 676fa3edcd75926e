"""MMC4-format preprocessing throughput (documents/s) with 1 and 2 workers over a range of
corpus sizes, and the crossover: the smallest size from which 2 workers beat 1. Sample data
from tools/make_sample_data.py (real JPEG files, validity check of every image, SentencePiece
tokenization); each size is the first N documents of one drawn corpus.

    python benchmarks/bench_preprocess.py [--documents 500 1000 2000 4000 8000] [--repeats 3]
    python benchmarks/bench_preprocess.py --smoke     # same code path, tiny sizes (seconds; the test-suite's check)

Times are best of --repeats (runs alternate between the settings), each one the whole
preprocess_files call: worker start-up included, which is what 2 workers must win back.
"--workers 1" encodes in this process on one thread per CPU (megatron_vl/data/lanes.py);
--workers N > 1 starts N processes sharing the CPUs.
"""

import argparse
import os
import shutil
import tempfile
import time
import zipfile

from megatron_vl.data.lanes import usable_cpus
from megatron_vl.data.preprocess import preprocess_files
from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke
from megatron_vl.testing.scripts import load_script


SMOKE = {"documents": [20], "repeats": 1}


def first_documents(shard: str, n: int, out: str) -> str:
    """A jsonl of the first n documents of an MMC4 zip shard."""
    with zipfile.ZipFile(shard) as zf, zf.open(zf.namelist()[0]) as fh:
        lines = fh.read().splitlines(keepends=True)
    if len(lines) < n:
        raise SystemExit(f"{shard}: {len(lines)} documents, fewer than {n}")
    with open(out, "wb") as fh:
        fh.writelines(lines[:n])
    return out


def crossover(sizes, best):
    """The smallest size from which (it and every larger one) 2 workers beat 1; None if none."""
    found = None
    for n in sorted(sizes, reverse=True):
        if best[(n, 2)] < best[(n, 1)]:
            found = n
        else:
            break
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    make_sample_data = load_script("tools/make_sample_data.py")
    work = tempfile.mkdtemp(prefix="bench_pre_")
    try:
        make_sample_data.main(["--output", work, "--documents", str(max(args.documents)), "--pairs", "1"])
        shard = os.path.join(work, "mmc4", "docs_shard_0_v2.jsonl.zip")
        print(f"{usable_cpus()} CPUs; best of {args.repeats}")
        best = {}
        for n in sorted(args.documents):
            corpus = first_documents(shard, n, os.path.join(work, f"first{n}.jsonl"))
            for _ in range(args.repeats):
                for workers in args.workers:
                    out = os.path.join(work, f"out{n}_{workers}")
                    t0 = time.perf_counter()
                    report = preprocess_files([corpus], out, "mmc4", "sentencepiece",
                                              os.path.join(work, "tokenizer.model"),
                                              image_root=os.path.join(work, "mmc4", "images"), append_eod=True,
                                              workers=workers, progress=False)
                    elapsed = time.perf_counter() - t0
                    best[(n, workers)] = min(best.get((n, workers), elapsed), elapsed)
            for workers in args.workers:
                rate = report.documents_written / best[(n, workers)]
                print(f"{n:>6} documents, {workers} worker(s): {report.images_placed} images in "
                      f"{best[(n, workers)]:.2f} s: {rate:,.0f} docs/s")
        if {1, 2} <= set(args.workers):
            at = crossover(args.documents, best)
            print(f"crossover (2 workers faster than 1 from here on, of the sizes run): "
                  f"{f'{at:,} documents' if at else 'none'}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

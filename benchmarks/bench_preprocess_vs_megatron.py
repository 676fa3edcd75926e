"""Our tools/preprocess_data.py against Megatron-LM's own tools/preprocess_data.py on the same
jsonl and SentencePiece BPE model, 1 worker each, --append-eod: documents/s of each, their
ratio, and a check that the .bin/.idx files are byte-identical.

    python benchmarks/bench_preprocess_vs_megatron.py --megatron-lm ~/Megatron-LM [--documents 20000]
    python benchmarks/bench_preprocess_vs_megatron.py --smoke     # same code path, tiny sizes

--megatron-lm names a local checkout (nothing is downloaded); a checkout at the tag of the
installed megatron-core (core_v0.16.1 here) is what was measured. Without it, the reference is
megatron-core's IndexedDatasetBuilder fed in this process by Megatron's per-document loop
(json.loads, SentencePiece encode, + eod): the same output, without Megatron's worker pool,
so a stricter reference than the tool itself; the output says which reference ran.

The corpus is synthetic English-like text: a Zipf vocabulary, sentences of 4-30 words,
paragraphs, and a log-normal document length (median 250 words, a long tail to 20,000), the
shape of web text. The tokenizer is a SentencePiece BPE model trained here on the corpus
(--vocab-size), unless --tokenizer-model names one. Each tool runs --repeats times in a fresh
process, the two alternating; the best wall time of each is reported (the machine may be
shared: the best run is the one least disturbed), with the CPU seconds it used (all its
processes). Times are whole commands: start-up (imports) included.

--cpus: each setting runs both tools on that many CPUs (the first of this process's affinity
mask, as taskset would; "all": the whole mask). At "1 worker" both may use more than one CPU:
Megatron's reader and its one pool worker are two processes, and ours encodes text on one
thread per CPU (megatron_vl/data/lanes.py). On one CPU neither can.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke
from megatron_vl.testing.processes import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = {"documents": 100, "vocab_size": 300, "repeats": 1, "cpus": ["all"]}

# Megatron-LM's tool imports megatron.training.arguments and .tokenizer; the package's
# __init__ also imports the whole training loop, whose kernels import triton (absent on a CPU
# machine). The package is therefore entered without running its __init__ (what the tool's
# two modules need from it, the global_vars getters, is put on it), and the tool then runs
# unchanged as __main__. The checkout goes at the end of sys.path, as the tool itself puts
# it: an installed megatron-core is the one imported, as when the tool is run by hand.
_MEGATRON_SHIM = """
import os, runpy, sys, types
root = sys.argv[1]
sys.path.append(root)
package = types.ModuleType("megatron.training")
package.__path__ = [os.path.join(root, "megatron", "training")]
sys.modules["megatron.training"] = package
import megatron.training.global_vars as global_vars
for name in dir(global_vars):
    if name.startswith("get_"):
        setattr(package, name, getattr(global_vars, name))
sys.argv = [os.path.join(root, "tools", "preprocess_data.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def synthetic_corpus(path: str, documents: int, seed: int = 0) -> int:
    """Writes `documents` jsonl lines {"text": ...}; returns the file's size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1.0 / np.arange(1, 27) ** 0.8
    lengths = np.clip(rng.geometric(0.25, 20000), 1, 14)
    words = np.array(["".join(rng.choice(letters, n, p=weights / weights.sum())) for n in lengths])
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    zipf /= zipf.sum()
    doc_words = np.clip(rng.lognormal(np.log(250), 1.0, documents).astype(int), 5, 20000)
    with open(path, "w", encoding="utf-8") as fh:
        for n in doc_words:
            picked = words[rng.choice(len(words), n, p=zipf)]
            cuts = np.cumsum(rng.integers(4, 31, n // 4 + 2))
            cuts = cuts[cuts < n]
            sentences = [" ".join(s) for s in np.split(picked, cuts)]
            text = []
            for i, s in enumerate(sentences):
                s = s[:1].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"])
                text.append(s + ("\n\n" if rng.random() < 0.15 and i + 1 < len(sentences) else " "))
            fh.write(json.dumps({"text": "".join(text).strip()}) + "\n")
    return os.path.getsize(path)


def train_tokenizer(corpus: str, prefix: str, vocab_size: int) -> str:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
                                   input_sentence_size=20000, shuffle_input_sentence=True, max_sentence_length=1 << 20,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    return prefix + ".model"


# Runs a command on the given CPUs (an affinity mask, inherited by all it starts).
_PINNED = "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); " \
          "os.execv(sys.executable, [sys.executable] + sys.argv[2:])"


def _pinned(cpus, argv):
    if cpus is None:
        return [sys.executable] + argv
    return [sys.executable, "-c", _PINNED, ",".join(map(str, cpus))] + argv


def run_ours(corpus: str, model: str, out: str, cpus=None) -> None:
    run_script(_pinned(cpus, [os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
                              "--input-format", "jsonl-text", "--output-prefix", out, "--tokenizer-type",
                              "sentencepiece", "--tokenizer-model", model, "--append-eod", "--workers", "1",
                              "--no-progress"]), timeout=None, expect=0, env=_env())


def run_megatron(megatron_lm: str, corpus: str, model: str, out: str, cpus=None) -> None:
    run_script(_pinned(cpus, ["-c", _MEGATRON_SHIM, megatron_lm, "--input", corpus, "--output-prefix", out,
                              "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model,
                              "--append-eod", "--workers", "1", "--log-interval", "1000000000"]),
               timeout=None, expect=0, env=_env())


def run_core_builder(corpus: str, model: str, out: str, cpus=None) -> None:
    """Megatron's per-document loop in this process, written by megatron-core's builder."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    sp = spm.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(out + "_text_document.bin", dtype=DType.optimal_dtype(sp.get_piece_size()))
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            ids = sp.encode_as_ids(json.loads(line)["text"]) + [sp.eos_id()]
            builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(out + "_text_document.idx")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timed(run):
    """(wall seconds, CPU seconds of this process and every child it waited for) of run()."""
    def cpu():
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    t0, c0 = time.perf_counter(), cpu()
    run()
    return time.perf_counter() - t0, cpu() - c0


def cpu_sets(settings):
    """--cpus values -> (label, CPU list or None for the whole mask)."""
    mask = sorted(os.sched_getaffinity(0))
    out = []
    for s in settings:
        if s == "all":
            out.append((f"all {len(mask)} CPUs", None))
        else:
            n = min(int(s), len(mask))
            out.append((f"{n} CPU{'s' if n > 1 else ''}", mask[:n]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-lm", help="a local Megatron-LM checkout (its tools/preprocess_data.py is run)")
    p.add_argument("--documents", type=int, default=20000)
    p.add_argument("--tokenizer-model", help="a SentencePiece .model (default: a BPE model trained here)")
    p.add_argument("--vocab-size", type=int, default=8000, help="of the BPE model trained here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", nargs="+", default=["all", "1"],
                   help="CPU settings to measure: 'all' (the affinity mask) or a count N (its first N CPUs)")
    p.add_argument("--work-dir", help="keep the corpus, model and outputs here (default: a temporary directory)")
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    if args.megatron_lm and not os.path.isfile(os.path.join(args.megatron_lm, "tools", "preprocess_data.py")):
        print(f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py there (a Megatron-LM checkout?)")
        return 2
    if not args.megatron_lm:
        try:   # imported now: its import (seconds) is not the loop's time
            import megatron.core.datasets.indexed_dataset   # noqa: F401
        except ImportError as exc:
            print(f"no reference to measure: give --megatron-lm DIR (a Megatron-LM checkout), or install "
                  f"megatron-core for the in-process one ({exc})")
            return 2
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_vs_megatron_")
    os.makedirs(work, exist_ok=True)
    try:
        corpus = os.path.join(work, f"corpus{args.documents}.jsonl")
        if not os.path.isfile(corpus):   # --work-dir: made once, reused
            synthetic_corpus(corpus, args.documents)
        size = os.path.getsize(corpus)
        model = args.tokenizer_model or train_tokenizer(corpus, os.path.join(work, f"bpe{args.vocab_size}"),
                                                        args.vocab_size)
        ours, theirs = os.path.join(work, "ours"), os.path.join(work, "megatron")
        if args.megatron_lm:
            reference = f"Megatron-LM tools/preprocess_data.py ({os.path.abspath(args.megatron_lm)})"
            run_theirs = lambda cpus: run_megatron(args.megatron_lm, corpus, model, theirs, cpus)   # noqa: E731
        else:
            reference = "megatron-core IndexedDatasetBuilder fed by Megatron's loop in this process " \
                        "(no --megatron-lm given; one CPU whatever --cpus says)"
            run_theirs = lambda cpus: run_core_builder(corpus, model, theirs, cpus)   # noqa: E731
        n = args.documents
        print(f"corpus: {n:,} documents, {size / 2**20:.1f} MiB; tokenizer {model}")
        print(f"reference: {reference}")
        identical = True
        for label, cpus in cpu_sets(args.cpus):
            mine, other = [], []
            for _ in range(args.repeats):
                _remove_outputs(theirs)
                _remove_outputs(ours)   # a stale file from an earlier run would pass the check unseen
                other.append(timed(lambda: run_theirs(cpus)))
                mine.append(timed(lambda: run_ours(corpus, model, ours, cpus)))
                identical &= all(_same(ours + "_text_document" + ext, theirs + "_text_document" + ext)
                                 for ext in (".bin", ".idx"))
            (t_theirs, c_theirs), (t_ours, c_ours) = min(other), min(mine)
            print(f"[{label}] megatron: {t_theirs:.2f} s ({c_theirs:.2f} CPU s), {n / t_theirs:,.0f} docs/s; "
                  f"ours: {t_ours:.2f} s ({c_ours:.2f} CPU s), {n / t_ours:,.0f} docs/s; "
                  f"ratio {t_theirs / t_ours:.2f}x (best of {args.repeats})")
        print(f".bin/.idx byte-identical in every run: {identical}")
        return 0 if identical else 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work)


def _remove_outputs(prefix: str) -> None:
    for name in os.listdir(os.path.dirname(prefix)):   # the data files, the metadata, a lock
        if name.startswith(os.path.basename(prefix) + "_text_document"):
            os.remove(os.path.join(os.path.dirname(prefix), name))


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


if __name__ == "__main__":
    sys.exit(main())

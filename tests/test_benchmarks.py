"""Every benchmarks/*.py runs in its --smoke mode (the same code path at the smallest sizes)
and prints its figures, so a benchmark cannot rot unseen against the code it measures.

Each script's main(argv) runs in this process (no interpreter start-up, imports shared) as a
one-rank job, so a benchmark that initialises torch.distributed or DeepSpeed leaves nothing
behind for the next. A new benchmark is covered by being in benchmarks/: it needs a
main(argv=None) and a --smoke flag. One that cannot run without CUDA says so with a
module-level ``REQUIRES_CUDA = True`` and is skipped (with that reason) on CPU-only machines.
"""

import glob
import importlib.util
import os
import re
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
BENCHMARKS = sorted(glob.glob(os.path.join(BENCH_DIR, "*.py")))
FIGURE = re.compile(r"\d+\.\d+|\d+(,\d{3})+")   # a measured figure: a decimal or a grouped count


def load(path):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # spawned ranks unpickle their function as <name>.<function>
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_covered():
    assert BENCHMARKS, f"no benchmarks found in {BENCH_DIR}"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: os.path.basename(p))
def test_benchmark_smoke(path, monkeypatch, capsys):
    from megatron_vl.testing.distributed import one_rank_job
    monkeypatch.syspath_prepend(BENCH_DIR)
    for key in list(os.environ):   # whatever a benchmark exports is put back afterwards
        monkeypatch.setenv(key, os.environ[key])
    module = load(path)
    if getattr(module, "REQUIRES_CUDA", False) and not torch.cuda.is_available():
        pytest.skip(f"{os.path.basename(path)} declares REQUIRES_CUDA and this machine has no CUDA")
    assert hasattr(module, "main"), f"{path}: no main(argv=None) to run"
    threads = torch.get_num_threads()
    try:
        try:
            code = one_rank_job(lambda: module.main(["--smoke"]), monkeypatch.setenv)
        except SystemExit as exc:
            code = exc.code
    finally:
        torch.set_flush_denormal(False)   # bench_pretrain_step turns it on; torch's default is off
        torch.set_num_threads(threads)
        sys.modules.pop(module.__name__, None)
    out = capsys.readouterr().out
    print(out)   # shown with the test's report (-rA, or on failure)
    assert code in (None, 0), f"{os.path.basename(path)} --smoke exited {code!r}:\n{out[-3000:]}"
    figures = [line for line in out.splitlines() if FIGURE.search(line)]
    assert figures, f"{os.path.basename(path)} --smoke printed no figures:\n{out[-3000:]}"

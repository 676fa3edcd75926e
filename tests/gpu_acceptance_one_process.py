"""benchmarks/gpu_acceptance.py's run with every check's child run in this one process
(tests/test_gpu_acceptance.py, --tiny on CPU). The parent builds each child's command as
always (--run-check NAME --result-file ... --tiny); here that command runs as a one-rank job
in this process instead of a new interpreter, and so do the kernels check's pytest and stage
1's train_tokenizer.py (bench_tokenizer_step's in-process path): a process re-imports torch,
DeepSpeed and transformers, most of a tiny check's time. The child process itself (its
command, its result file, its timeout) is test_a_check_failing_in_its_child_process_fails_the_run's.

    PYTHONPATH=<checkout>:<checkout>/benchmarks python tests/gpu_acceptance_one_process.py --tiny --report R
"""

import os
import sys

import torch

import bench_tokenizer_step
import gpu_acceptance
from megatron_vl.testing.distributed import one_rank_job
from megatron_vl.testing import processes
from megatron_vl.testing.processes import Finished


def run_check_here(cmd, cwd=None, env=None, timeout=None, merge_stderr=False):
    """What run_script would start, `python gpu_acceptance.py --run-check ...`, run here as a
    process of its own would run it: the child's environment, then this one's again; a one-rank
    job (no process group left behind); torch's functions as it found them."""
    assert [str(c) for c in cmd[:2]] == [sys.executable, os.path.abspath(gpu_acceptance.__file__)], cmd
    before, functional = dict(os.environ), dict(vars(torch.nn.functional))
    os.environ.update(env or {})
    try:
        code = one_rank_job(lambda: gpu_acceptance.main([str(c) for c in cmd[2:]]))
    finally:
        os.environ.clear()
        os.environ.update(before)
        # ZeRO-3 (the memory check's) swaps torch.nn.functional.linear for DeepSpeed's own for
        # the rest of a process (measured: the generation check then computes differently)
        for name, value in functional.items():
            setattr(torch.nn.functional, name, value)
    return Finished(cmd, code, "", None)


def pytest_here(cmd, cwd=None, env=None, timeout=None, merge_stderr=False):
    """The kernels check's `python -m pytest -m gpu ...` (gpu_checks.kernels_check) run here from
    its directory: the GPU tests' collection without another interpreter's imports."""
    import pytest
    assert [str(c) for c in cmd[:3]] == [sys.executable, "-m", "pytest"], cmd
    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = pytest.main([str(c) for c in cmd[3:]])
    finally:
        os.chdir(here)
    return Finished(cmd, int(code), "", None)


def main(argv):
    gpu_acceptance.run_script = run_check_here
    processes.run_script = pytest_here   # kernels_check imports it when it runs
    in_a_process = bench_tokenizer_step.run
    bench_tokenizer_step.run = lambda cmd, in_process=False: in_a_process([str(c) for c in cmd], in_process=True)
    return gpu_acceptance.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

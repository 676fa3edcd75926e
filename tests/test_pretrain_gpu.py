"""pretrain_vlgpt on one CUDA device, fp16 (dynamic loss scaling) and bf16, with
--fused-kernels require (flash-attn varlen over the documents, Liger's kernels): every fused
kernel runs, the loss falls, and the first K logged losses match a --fused-kernels torch run
on the same batches (same seed, same data) within the precision's tolerance
(megatron_vl/testing/loss_parity.py: bf16 0.5% at the first step, 2% later; fp16 0.1%, 0.5%).

The comparison also runs here on CPU, where `auto` takes the torch path: two runs that must
agree bit for bit pass it, and a pair that drifts apart is refused, so the GPU test can fail."""

import os

import pytest
import torch

from megatron_vl.testing import processes
from megatron_vl.testing.loss_parity import TOLERANCES, check_losses
from pretrain_helpers import PY, ROOT, logged_losses, tiny_args

K = 10         # steps compared
ITERS = 30     # steps of the fused run (the loss must fall)
FUSED_OPS = ("attention=flash_attn", "rms_norm=liger_kernel", "rope=liger_kernel", "swiglu=liger_kernel")


def kernel_run(vl_data, precision: str, kernels: str, iters: int):
    """pretrain_vlgpt.py with document isolation on the tiny corpus: (its output, the lm
    losses it logged, in order). DS_ACCELERATOR follows the machine (conftest's default is cpu)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cuda" if torch.cuda.is_available() else "cpu")
    cmd = [PY, "pretrain_vlgpt.py", *tiny_args(vl_data, f"--{precision}", "--fused-kernels", kernels,
                                                "--reset-attention-mask", iters=iters)]
    out = processes.run_script(cmd, cwd=ROOT, env=env, timeout=240, expect=0).output
    losses = logged_losses(out)
    return out, [float(losses[i][1]) for i in sorted(losses)]


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fused_kernels_match_torch_on_cuda(vl_data, precision):
    out, fused = kernel_run(vl_data, precision, "require", ITERS)
    _, reference = kernel_run(vl_data, precision, "torch", K)
    kernels = next(line for line in out.splitlines() if line.startswith("kernels (--fused-kernels require)"))
    for op in FUSED_OPS:
        assert op in kernels, kernels
    assert len(fused) == ITERS and sum(fused[-5:]) / 5 < sum(fused[:5]) / 5 - 0.3
    check_losses(fused[:K], reference, TOLERANCES[precision], f"{precision} --fused-kernels require against torch")
    if precision == "fp16":
        assert "loss scale:" in out


def test_loss_comparison_passes_equal_runs_and_refuses_drift_on_cpu(vl_data):
    """On CPU `auto` is the torch path: the two runs agree exactly through the same check; the
    same losses with one later step 3% off are refused."""
    if torch.cuda.is_available():
        pytest.skip("on CUDA, auto takes the fused kernels: the GPU test above compares them")
    _, torch_run = kernel_run(vl_data, "bf16", "torch", K)
    _, auto_run = kernel_run(vl_data, "bf16", "auto", K)
    assert len(torch_run) == K
    result = check_losses(auto_run, torch_run, TOLERANCES["bf16"], "bf16 auto against torch on CPU")
    assert result.ok and result.max_abs == 0.0
    drifted = list(torch_run)
    drifted[5] *= 1.03
    with pytest.raises(AssertionError, match="step 6 over tolerance"):
        check_losses(drifted, torch_run, TOLERANCES["bf16"], "drifted")

"""pretrain_vlgpt on one CUDA device: fp16 with dynamic loss scaling and bf16, fused kernels."""

import pytest

from pretrain_helpers import PY, logged_losses, run_script, tiny_args


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_mixed_precision_trains_on_cuda(vl_data, precision):
    out = run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, precision, "--fused-kernels", "auto", iters=30)])
    losses = logged_losses(out)
    lm = [float(losses[i][1]) for i in sorted(losses)]
    assert len(lm) == 30 and sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 0.3
    if precision == "--fp16":
        assert "loss scale:" in out

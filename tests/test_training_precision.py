"""The training precision has one home: the training section's `precision` name and
`torch_dtype`, read by every stage (pretraining, instruction tuning, stage 1, the export, the
planner); config itself stays importable without torch."""

import sys

import pytest
import torch

from megatron_vl.config import load_config
from megatron_vl.stage1.config import TokenizerTrainConfig
from megatron_vl.testing import processes


@pytest.mark.parametrize("flags, name, dtype", [
    ([], "fp32", torch.float32),
    (["--bf16"], "bf16", torch.bfloat16),
    (["--fp16"], "fp16", torch.float16),
    (["--bf16", "--no-bf16"], "fp32", torch.float32),
])
def test_precision_and_dtype_follow_the_flags(flags, name, dtype):
    t = load_config(flags)[0].training
    assert (t.precision, t.torch_dtype) == (name, dtype)
    t1 = load_config(flags, config_cls=TokenizerTrainConfig)[0].training   # stage 1's loop section
    assert (t1.precision, t1.torch_dtype) == (name, dtype)


def test_the_config_package_does_not_import_torch():
    code = "import sys, megatron_vl.config; print('torch' in sys.modules)"
    out = processes.run_script([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

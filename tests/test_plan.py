"""The planner: parameter counts of the paper's model per rank (built on the meta device
through the training code) against counts written out by hand from the architecture."""

import pytest

from megatron_vl.config import load_config
from megatron_vl.plan.counts import rank_parameters

pytestmark = pytest.mark.timeout(300)

H, L, HEADS, F, V, R, D = 4096, 32, 32, 11008, 32002, 32, 4096
PAPER = ["--hidden-size", H, "--num-layers", L, "--num-attention-heads", HEADS, "--ffn-hidden-size", F,
         "--vocab-size", V, "--lora-rank", R, "--lora-alpha", 2 * R, "--visual-embed-dim", D, "--seq-length", 512]


def _paper_config():
    cfg, _ = load_config([str(a) for a in PAPER])
    return cfg


def _expected_params(tp, pp, stage):
    """(elements, trainable) of every parameter one TP rank of a stage holds, by hand:
    LLaMA-7B sliced Megatron-style, LoRA r on q,k,v,o,gate,up,down (A whole / B split on
    column-parallel layers, A split / B whole on row-parallel ones), the visual projection
    and regression head (trainable, whole), the [IMG]/[/IMG] row deltas (trainable, whole)."""
    vp = -(-V // (128 * tp)) * (128 * tp)
    out = []
    if stage == 0:
        out += [(vp // tp * H, False), (D * H, True), (H, True), (2 * H, True)]   # table, proj w+b, row deltas
    for _ in range(L // pp):
        out += [(H, False), (H, False)]                                    # the two norms
        out += [(3 * H * H // tp, False), (H * H // tp, False)]            # qkv, o
        out += [(2 * F * H // tp, False), (F * H // tp, False)]            # gate_up, down
        out += [(R * H, True)] * 3 + [(H // tp * R, True)] * 3             # q, k, v: A, B
        out += [(R * H // tp, True), (H * R, True)]                        # o: A, B
        out += [(R * H, True)] * 2 + [(F // tp * R, True)] * 2             # gate, up: A, B
        out += [(R * F // tp, True), (H * R, True)]                        # down: A, B
    if stage == pp - 1:
        out += [(H, False), (vp // tp * H, False), (2 * H, True), (H * D, True), (D, True)]
    return out


def _held(params, trainable, zero3_dp=None):
    return sum((n if zero3_dp is None or n <= 100_000 else -(-n // zero3_dp)) for n, t in params if t == trainable)


@pytest.mark.parametrize("tp,pp,dp,zero", [(1, 1, 32, 3), (2, 4, 4, 1), (8, 1, 4, 1)])
def test_paper_model_parameters_per_rank(tp, pp, dp, zero):
    counts = rank_parameters(_paper_config(), tp, pp, dp, zero)
    assert len(counts) == pp
    for stage, got in enumerate(counts):
        params = _expected_params(tp, pp, stage)
        for trainable, key in ((True, "trainable"), (False, "frozen")):
            assert got[f"{key}_slice"] == _held(params, trainable), (stage, key)
            assert got[key] == _held(params, trainable, dp if zero == 3 else None), (stage, key)
    if (tp, pp) == (1, 1):   # the whole model: LLaMA-7B (+128 padding rows, 2 new tokens) + LoRA + visual heads
        assert counts[0]["frozen_slice"] == 6_739_464_192
        assert counts[0]["trainable_slice"] == 79_953_920 + 2 * (D * H + D) + 2 * 2 * H
        assert counts[0]["frozen"] == 210_866_176 and counts[0]["trainable"] == 3_571_712


def test_planner_cli_prints_the_paper_run_table_and_help(capsys):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "plan_parallelism", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "plan_parallelism.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--preset", "A100-40GB", "--gpus", "32", "--global-batch-size", "4096", "--bf16",
                      "--top", "400"] + [str(a) for a in PAPER]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:3].strip().isdigit()]
    assert rows and rows[0][-4] == "yes"                      # the best layout fits
    fits = [r[-4] == "yes" for r in rows]
    assert fits == sorted(fits, reverse=True)                 # fitting layouts first
    # ZeRO-3 over 32: the weights column is the held elements in bf16 (counted by hand above).
    zero3 = next(r for r in rows if r[:6] == ["1", "1", "32", "3", "1", "no"])
    assert float(zero3[7]) == pytest.approx((210_866_176 + 3_571_712) * 2 / 2**30, abs=0.005)
    assert tool.main(["--deepspeed_config", "/nonexistent/ds.json"] + [str(a) for a in PAPER]) == 2
    assert "error: --deepspeed_config /nonexistent/ds.json: [Errno 2] No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "--preset A100-40GB --gpus 32" in capsys.readouterr().out

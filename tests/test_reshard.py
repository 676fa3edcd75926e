"""Resuming under another layout: 2 steps at TP=2 x ZeRO-1, then PP=2 continues to step 6,
and from its step-4 checkpoint DP=4 x ZeRO-3 does: every step matches the straight run
(which is what a resume at the original layout gives: test_pretrain checks that). A dropped
Adam moment must show, or the check proves nothing."""

import pytest

from megatron_vl.testing.distributed import run_distributed
from pretrain_helpers import pretrain_rank, tiny_args

ITERS, HALF = 6, 2


def _losses(history):
    return {h["iteration"]: (h["lm"], h["visual"]) for h in history}


def _resumed_rank(rank, world, argv, drop_moment):
    if drop_moment:   # the resumed optimizer keeps exp_avg at zero: a wrong first moment
        import deepspeed.utils
        original = deepspeed.utils.safe_set_full_optimizer_state

        def without_first_moment(param, value, key):
            if key != "exp_avg":
                original(param, value, key)
        deepspeed.utils.safe_set_full_optimizer_state = without_first_moment
    return pretrain_rank(rank, world, argv)


def _run(world, argv, drop_moment=False):
    return run_distributed(_resumed_rank, world, [str(a) for a in argv], drop_moment, timeout=240)[-1]


@pytest.fixture(scope="module")
def straight(vl_data, tmp_path_factory):
    """TP=2 x ZeRO-1 (world 2), global batch 8 in micro-batches of 2, checkpoint at step 2."""
    save = str(tmp_path_factory.mktemp("tp2_zero1"))
    args = tiny_args(vl_data, "--global-batch-size", 8, "--tensor-model-parallel-size", 2, "--zero-stage", 1,
                     "--save", save, "--save-interval", HALF, iters=ITERS)
    return _losses(_run(2, args)), save


def _assert_match(straight, resumed, tol=1e-5, start=HALF):
    assert sorted(resumed) == list(range(start + 1, ITERS + 1))
    for it in resumed:
        for a, b in zip(straight[it], resumed[it]):
            assert abs(a - b) <= tol, f"iteration {it}: straight {straight[it]}, resumed {resumed[it]}"


@pytest.mark.timeout(600)
def test_resume_at_pp2_and_then_at_dp4_zero3_continues_the_run(vl_data, straight, tmp_path, capfd):
    losses, save = straight
    pp2_save = tmp_path / "pp2"
    pp2 = _run(2, tiny_args(vl_data, "--global-batch-size", 8, "--load", save, "--ckpt-step", HALF,
                            "--pipeline-model-parallel-size", 2, "--save", pp2_save, "--save-interval", 2,
                            iters=ITERS))
    out = capfd.readouterr().out
    assert (f"loaded checkpoint {save}/iter_0000002 (iteration 2, 16 samples consumed) written at tp 2 x pp 1 x dp 1, "
            f"ZeRO-1; this run: tp 1 x pp 2 x dp 1, ZeRO-1: weights, LoRA, visual heads, Adam moments") in out
    _assert_match(losses, _losses(pp2))
    # A pipeline-parallel checkpoint (one file set per stage) moves on to ZeRO-3 over 4 ranks.
    dp4 = _run(4, tiny_args(vl_data, "--global-batch-size", 8, "--load", pp2_save, "--ckpt-step", 4,
                            "--zero-stage", 3, iters=ITERS))
    assert "written at tp 1 x pp 2 x dp 1, ZeRO-1; this run: tp 1 x pp 1 x dp 4, ZeRO-3" in capfd.readouterr().out
    _assert_match(losses, _losses(dp4), start=4)


@pytest.mark.timeout(300)
def test_a_dropped_moment_is_caught(vl_data, straight):
    losses, save = straight
    wrong = _losses(_run(2, tiny_args(vl_data, "--global-batch-size", 8, "--load", save, "--ckpt-step", HALF,
                                      "--pipeline-model-parallel-size", 2, iters=ITERS), drop_moment=True))
    assert wrong[HALF + 1] == pytest.approx(losses[HALF + 1], abs=1e-5)   # the weights came through
    with pytest.raises(AssertionError, match="iteration 4"):
        _assert_match(losses, wrong)


@pytest.mark.timeout(300)
def test_lora_run_moves_from_tp2_zero1_to_dp2_zero3(vl_data, tmp_path):
    """Frozen base, adapters, [IMG]/[/IMG] row deltas and visual heads with their moments."""
    lora = ["--lora-rank", 4, "--lora-alpha", 8, "--global-batch-size", 8]
    straight = _losses(_run(2, tiny_args(vl_data, *lora, "--tensor-model-parallel-size", 2, "--save", tmp_path,
                                         "--save-interval", HALF, iters=ITERS)))
    resumed = _run(2, tiny_args(vl_data, *lora, "--zero-stage", 3, "--load", tmp_path, "--ckpt-step", HALF,
                                iters=ITERS))
    _assert_match(straight, _losses(resumed))

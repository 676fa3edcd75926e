"""Resuming under another layout: 2 steps at TP=2 x ZeRO-1, then PP=2 continues to step 6,
and from its step-4 checkpoint DP=4 x ZeRO-3 does: every step matches the straight run
(which is what a resume at the original layout gives: test_pretrain checks that). A dropped
Adam moment must show, or the check proves nothing.

The two-rank runs, straight and resumed, share one set of processes (module fixture `jobs`,
tests/rank_jobs.py)."""

import contextlib

import pytest

from megatron_vl.testing.distributed import run_distributed
from pretrain_helpers import pretrain_rank, tiny_args
from rank_jobs import printing

ITERS, HALF = 6, 2


def _losses(history):
    return {h["iteration"]: (h["lm"], h["visual"]) for h in history}


@contextlib.contextmanager
def _first_moment_dropped():
    """The resumed optimizer keeps exp_avg at zero: a wrong first moment."""
    import deepspeed.utils
    original = deepspeed.utils.safe_set_full_optimizer_state

    def without_first_moment(param, value, key):
        if key != "exp_avg":
            original(param, value, key)
    deepspeed.utils.safe_set_full_optimizer_state = without_first_moment
    try:
        yield
    finally:
        deepspeed.utils.safe_set_full_optimizer_state = original


def _runs_rank(rank, world, jobs):
    """Each (argv, drop_moment) in turn: (last rank's history, what this rank printed)."""
    out = []
    for argv, drop_moment in jobs:
        with _first_moment_dropped() if drop_moment else contextlib.nullcontext():
            out.append(printing(lambda: pretrain_rank(rank, world, argv)))
    return out


def _run(world, *jobs):
    """The jobs (argv, drop_moment) in one set of `world` processes: per job, (the last rank's
    history as {iteration: losses}, what rank 0 printed)."""
    ranks = run_distributed(_runs_rank, world, [([str(a) for a in argv], drop) for argv, drop in jobs],
                            timeout=min(240 * len(jobs), 540))
    return [(_losses(last[0]), first[1]) for first, last in zip(ranks[0], ranks[-1])]


@pytest.fixture(scope="module")
def jobs(vl_data, tmp_path_factory):
    """In one set of two processes: TP=2 x ZeRO-1 (global batch 8 in micro-batches of 2,
    checkpoint at step 2) straight; resumed at PP=2 (checkpoint at step 4); resumed at PP=2
    with the first Adam moment dropped; a LoRA run at TP=2 and its resume at DP=2 x ZeRO-3 (last:
    DeepSpeed's ZeRO-3 keeps torch.nn.functional.linear its own for the rest of a process)."""
    save, pp2_save, lora_save = (str(tmp_path_factory.mktemp(n)) for n in ("tp2_zero1", "pp2", "lora_tp2"))
    resume_pp2 = ["--global-batch-size", 8, "--load", save, "--ckpt-step", HALF, "--pipeline-model-parallel-size", 2]
    lora = ["--lora-rank", 4, "--lora-alpha", 8, "--global-batch-size", 8]
    argvs = {
        "straight": (tiny_args(vl_data, "--global-batch-size", 8, "--tensor-model-parallel-size", 2, "--zero-stage", 1,
                               "--save", save, "--save-interval", HALF, iters=ITERS), False),
        "pp2": (tiny_args(vl_data, *resume_pp2, "--save", pp2_save, "--save-interval", 2, iters=ITERS), False),
        "dropped_moment": (tiny_args(vl_data, *resume_pp2, iters=ITERS), True),
        "lora_straight": (tiny_args(vl_data, *lora, "--tensor-model-parallel-size", 2, "--save", lora_save,
                                    "--save-interval", HALF, iters=ITERS), False),
        "lora_resumed": (tiny_args(vl_data, *lora, "--zero-stage", 3, "--load", lora_save, "--ckpt-step", HALF,
                                   iters=ITERS), False),
    }
    results = dict(zip(argvs, _run(2, *argvs.values())))
    return dict(results, save=save, pp2_save=pp2_save)


def _assert_match(straight, resumed, tol=1e-5, start=HALF):
    assert sorted(resumed) == list(range(start + 1, ITERS + 1))
    for it in resumed:
        for a, b in zip(straight[it], resumed[it]):
            assert abs(a - b) <= tol, f"iteration {it}: straight {straight[it]}, resumed {resumed[it]}"


@pytest.mark.timeout(600)
def test_resume_at_pp2_and_then_at_dp4_zero3_continues_the_run(vl_data, jobs):
    losses, save = jobs["straight"][0], jobs["save"]
    pp2, out = jobs["pp2"]
    assert (f"loaded checkpoint {save}/iter_0000002 (iteration 2, 16 samples consumed) written at tp 2 x pp 1 x dp 1, "
            f"ZeRO-1; this run: tp 1 x pp 2 x dp 1, ZeRO-1: weights, LoRA, visual heads, Adam moments") in out
    _assert_match(losses, pp2)
    # A pipeline-parallel checkpoint (one file set per stage) moves on to ZeRO-3 over 4 ranks.
    [(dp4, out)] = _run(4, (tiny_args(vl_data, "--global-batch-size", 8, "--load", jobs["pp2_save"], "--ckpt-step", 4,
                                      "--zero-stage", 3, iters=ITERS), False))
    assert "written at tp 1 x pp 2 x dp 1, ZeRO-1; this run: tp 1 x pp 1 x dp 4, ZeRO-3" in out
    _assert_match(losses, dp4, start=4)


@pytest.mark.timeout(600)   # whichever test comes first runs the fixture's jobs
def test_a_dropped_moment_is_caught(jobs):
    losses, wrong = jobs["straight"][0], jobs["dropped_moment"][0]
    assert wrong[HALF + 1] == pytest.approx(losses[HALF + 1], abs=1e-5)   # the weights came through
    with pytest.raises(AssertionError, match="iteration 4"):
        _assert_match(losses, wrong)


@pytest.mark.timeout(600)
def test_lora_run_moves_from_tp2_zero1_to_dp2_zero3(jobs):
    """Frozen base, adapters, [IMG]/[/IMG] row deltas and visual heads with their moments."""
    _assert_match(jobs["lora_straight"][0], jobs["lora_resumed"][0])

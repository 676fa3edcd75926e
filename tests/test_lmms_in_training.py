"""--eval-harness lmms: lmms-eval tasks (megatron_vl.testing.lmms_tasks: generate_until,
multiple_choice, loglikelihood over the tiny VQA files) run on the training model at
--eval-interval, 2 gloo ranks under ZeRO-3 in lockstep. In one set of two processes
(tests/rank_jobs.py): the run with the evaluation, the same run without it (its losses equal bit
for bit: hidden dropout on, so a moved RNG stream would show), lmms-eval on the HF export of the
checkpoint the first run saved at its last evaluation (same answers, same figures), and the
pre-run errors."""

import contextlib
import io
import math
import os
import re
import sys
import time

import pytest

from helpers import require_lmms_eval  # noqa: E402

require_lmms_eval("--eval-harness lmms needs lmms-eval (pip install -e .[lmms])")

from megatron_vl.testing.distributed import run_distributed  # noqa: E402
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, logged_losses, tiny_args  # noqa: E402
from rank_jobs import printing  # noqa: E402

PREFIX = "lmms_train"
TASKS = [f"{PREFIX}_vqa", f"{PREFIX}_mc", f"{PREFIX}_ll"]
ITEMS = 2
PAUSE = 1.5   # seconds added to the first evaluation


def _train(argv):
    """pretrain_vlgpt.py's job in this rank: the trainer."""
    from megatron_vl.training.pretrain import pretrain
    trainer = pretrain(argv)
    assert trainer.exit_code == 0, f"exit code {trainer.exit_code}"
    return trainer


def _samples(results):
    """{task: [(doc_id, filtered response)]}: the answers, or (nll, greedy) pairs per choice."""
    return {task: [(s["doc_id"], s["filtered_resps"]) for s in rows] for task, rows in results["samples"].items()}


def _exit(argv, hide_lmms=False):
    """(exit code, stderr) of pretrain_vlgpt.py's job that stops at its configuration checks."""
    from megatron_vl.training.engine import exit_code
    from megatron_vl.training.pretrain import pretrain
    err = io.StringIO()
    saved = sys.modules.get("lmms_eval")
    if hide_lmms:
        sys.modules["lmms_eval"] = None   # what an environment without lmms-eval looks like to find_spec
    try:
        with contextlib.redirect_stderr(err):
            code = exit_code(lambda: pretrain(argv))
    finally:
        if hide_lmms:
            sys.modules["lmms_eval"] = saved
    return code, err.getvalue()


def _rank(rank, world, hf_home, with_eval, without_eval, tp_eval, save, export_dir, itok, include, bad):
    """Both runs; the first run's last checkpoint loaded at TP=2 and evaluated (nothing left to
    train: the run's closing evaluation); then lmms-eval on the export of that checkpoint (every
    rank: simple_evaluate's barrier is collective); rank 0 also the configurations that must fail."""
    os.environ.update(HF_HOME=hf_home, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import torch.distributed as dist
    from megatron_vl.eval.lmms import training as lmms_training
    lmms_training.LmmsEvaluator.log_samples = True   # keep the answers for the comparison
    from megatron_vl.training.pretrain import VLGPTTrainer
    evaluate = VLGPTTrainer.evaluate

    def slow_first_evaluation(self):   # the step after it must not be charged for it
        evaluate(self)
        if self.iteration == 1:
            time.sleep(PAUSE)
    VLGPTTrainer.evaluate = slow_first_evaluation
    try:
        trainer, printed = printing(lambda: _train(with_eval))
    finally:
        VLGPTTrainer.evaluate = evaluate
    trained = _samples(trainer.evaluator.last)
    plain, plain_printed = printing(lambda: _train(without_eval))
    tp, tp_printed = printing(lambda: _train(tp_eval))
    if rank == 0:
        from megatron_vl.convert.vlgpt_export import export_vlgpt
        export_vlgpt(save, export_dir, image_tokenizer=itok, log=lambda *_: None)
    dist.barrier()
    from megatron_vl.eval.lmms.checks import import_lmms, resolve_tasks
    _, _, VLGPTLmms = import_lmms()
    manager, _ = resolve_tasks(include, TASKS)
    lm = VLGPTLmms(pretrained=export_dir, device="cpu", batch_size=2)
    reference = lmms_training.run_lmms_tasks(lm, manager, TASKS, ITEMS, rank, log_samples=True)
    errors = [_exit(argv, hide) for argv, hide in bad] if rank == 0 else None
    return dict(history=[(h["iteration"], h["lm"], h["visual"]) for h in trainer.history],
                plain_history=[(h["iteration"], h["lm"], h["visual"]) for h in plain.history],
                printed=printed, plain_printed=plain_printed, trained=trained,
                figures=lmms_training.figures(trainer.evaluator.last), reference=_samples(reference),
                tp=_samples(tp.evaluator.last), tp_figures=lmms_training.figures(tp.evaluator.last),
                tp_printed=tp_printed,
                reference_figures=lmms_training.figures(reference), errors=errors)


@pytest.fixture(scope="module")
def runs(vl_data, annotations, tmp_path_factory):
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.testing.lmms_tasks import write_vqa_tasks
    d = tmp_path_factory.mktemp("lmms_in_training")
    clip = os.path.join(os.path.dirname(os.path.dirname(vl_data)), "clip")
    itok = str(d / "itok")
    ImageTokenizer.from_clip(clip, ImageTokenizerConfig(NUM_IMAGE_TOKENS, EMBED_DIM, 1, 2)).save_pretrained(
        itok, load_image_processor(clip))
    include = str(write_vqa_tasks(d, annotations, prefix=PREFIX))
    common = ["--zero-stage", 3, "--hidden-dropout", 0.1, "--eval-interval", 1]
    lmms = ["--eval-harness", "lmms", "--eval-lmms-include-path", include, "--eval-image-tokenizer", itok,
            "--eval-max-items", ITEMS]
    with_eval = tiny_args(vl_data, *common, *lmms, "--eval-tasks", *TASKS, "--save", d / "ckpt",
                          "--tensorboard-dir", d / "tb", iters=2)
    without_eval = tiny_args(vl_data, *common, iters=2)
    tp_eval = tiny_args(vl_data, "--tensor-model-parallel-size", 2, "--hidden-dropout", 0.1, *lmms, "--eval-tasks",
                        *TASKS, "--load", d / "ckpt", iters=2)
    bad = [(tiny_args(vl_data, "--eval-harness", "lmms", "--eval-tasks", TASKS[0], "--eval-tasks-config",
                      d / "tasks.json", "--pipeline-model-parallel-size", 2), True),
           (tiny_args(vl_data, *lmms, "--eval-tasks", TASKS[0], "no_such_task"), False)]
    ranks = run_distributed(_rank, 2, str(d / "hf_home"), [str(a) for a in with_eval],
                            [str(a) for a in without_eval], [str(a) for a in tp_eval], str(d / "ckpt"), str(d / "export"), itok, include,
                            [([str(a) for a in argv], hide) for argv, hide in bad], timeout=400)
    return ranks, d, include


@pytest.mark.timeout(420)
def test_lmms_tasks_run_on_the_training_model_at_the_eval_interval(runs):
    ranks, d, _ = runs
    first, last = ranks
    lines = [line for line in first["printed"].splitlines() if line.startswith("evaluation at iteration")]
    assert [line.split(" |")[0] for line in lines] == ["evaluation at iteration 1", "evaluation at iteration 2"]
    figures = first["figures"]
    assert {task: sorted(values) for task, values in figures.items()} == {
        f"{PREFIX}_vqa": ["exact_match", "vqa_accuracy"], f"{PREFIX}_mc": ["acc"], f"{PREFIX}_ll": ["acc", "nll"]}
    # The last line is the last evaluation's: every figure, as lmms-eval computed it.
    assert lines[1].split(" | ")[1:] == [f"{task} {metric}: {value:.4f}" for task, values in figures.items()
                                         for metric, value in values.items()]
    # Only rank 0 prints: neither the figures nor lmms-eval's own output come from rank 1.
    assert "evaluation at iteration" not in last["printed"] and "lmms_eval" not in last["printed"]
    assert last["figures"] == figures   # every rank ran every item (rank 0's tokens, rank 0's scores)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(d / "tb"))
    events.Reload()
    for task, values in figures.items():
        for metric, value in values.items():
            logged = events.Scalars(f"eval/{task}/{metric}")
            assert [e.step for e in logged] == [1, 2]
            assert logged[-1].value == pytest.approx(value, rel=1e-6)


def test_the_answers_and_figures_are_lmms_evals_on_the_export_of_that_checkpoint(runs):
    ranks, _, _ = runs
    first = ranks[0]
    trained, reference = first["trained"], first["reference"]
    assert sorted(trained) == sorted(reference) == sorted(TASKS)
    assert [doc for doc, _ in trained[f"{PREFIX}_vqa"]] == list(range(ITEMS))
    # Generated answers: the same text.
    assert trained[f"{PREFIX}_vqa"] == reference[f"{PREFIX}_vqa"]
    assert any(answer.strip() for _, (answer,) in trained[f"{PREFIX}_vqa"])   # not all empty: a real comparison
    # Likelihoods (mean NLL per continuation token, greedy or not): the same up to kernel rounding.
    for task in (f"{PREFIX}_mc", f"{PREFIX}_ll"):
        for (doc, ours), (ref_doc, theirs) in zip(trained[task], reference[task]):
            assert doc == ref_doc and len(ours) == len(theirs) > 0
            for (nll, greedy), (ref_nll, ref_greedy) in zip(ours, theirs):
                assert greedy == ref_greedy and math.isfinite(nll) and nll == pytest.approx(ref_nll, rel=1e-5)
    ours, theirs = first["figures"], first["reference_figures"]
    assert ours.keys() == theirs.keys()
    for task in ours:
        assert ours[task] == pytest.approx(theirs[task], rel=1e-5), task


def test_tensor_parallel_ranks_evaluate_as_zero3_did(runs):
    """The same weights at TP=2 (the ZeRO-3 checkpoint loaded; vocabulary-parallel logits
    gathered, both TP ranks running every forward): the same answers, the same likelihoods up to
    the reduction order, the same figures on both ranks."""
    ranks, _, _ = runs
    first, last = ranks
    assert "evaluation at iteration 2 |" in first["tp_printed"]
    assert first["tp"][f"{PREFIX}_vqa"] == first["trained"][f"{PREFIX}_vqa"]
    for task in (f"{PREFIX}_mc", f"{PREFIX}_ll"):
        for (doc, ours), (ref_doc, theirs) in zip(first["tp"][task], first["trained"][task]):
            assert doc == ref_doc and len(ours) == len(theirs) > 0
            for (nll, greedy), (ref_nll, ref_greedy) in zip(ours, theirs):
                assert greedy == ref_greedy and nll == pytest.approx(ref_nll, rel=1e-5)
    assert last["tp_figures"] == first["tp_figures"]
    for task, values in first["tp_figures"].items():
        assert values == pytest.approx(first["figures"][task], rel=1e-5), task


def test_the_evaluation_moves_no_weight_and_no_random_stream(runs):
    ranks, _, _ = runs
    _, last = ranks
    assert last["history"] == last["plain_history"] and [h[0] for h in last["history"]] == [1, 2]
    # The console lines as printed (the last rank prints them, as in Megatron), to 9 digits.
    assert sorted(logged_losses(last["printed"])) == [1, 2]
    assert logged_losses(last["printed"]) == logged_losses(last["plain_printed"])


def test_the_step_after_an_evaluation_is_not_charged_for_it(runs):
    """The step time of iteration 2 leaves out the evaluation after iteration 1 (its lmms-eval
    setup, its documents and a 1.5 s pause added to it), as Megatron's interval timer does."""
    last = runs[0][-1]   # the rank that prints the iteration lines
    step_ms = {int(m[0]): float(m[1]) for m in
               re.findall(r"iteration\s+(\d+)/.*?step time: ([\d.]+) ms", last["printed"])}
    assert sorted(step_ms) == [1, 2] and step_ms[2] < PAUSE * 1000, step_ms


def test_lmms_settings_that_cannot_run_stop_before_training(runs):
    ranks, d, include = runs
    (code, out), (code2, out2) = ranks[0]["errors"]
    assert code == 2 and code2 == 2
    lines = out.splitlines()
    assert lines[0] == "error: invalid configuration:"
    for expected in ("--eval-harness lmms runs on the training model and does not support pipeline parallelism",
                     f"--eval-tasks-config {d / 'tasks.json'}: only --eval-harness builtin reads it (lmms-eval "
                     "tasks name their own data; see --eval-lmms-include-path)",
                     "--eval-tasks needs --eval-image-tokenizer (the image tokenizer of the data's features)",
                     "--eval-harness lmms needs lmms-eval: pip install -e .[lmms]"):
        assert f"  - {expected}" in lines, (expected, out)
    assert out2.splitlines() == ["error: invalid configuration:",
                                 f"  - --eval-tasks no_such_task: no such lmms-eval task (looked in {include} or "
                                 "lmms-eval's built-in tasks)"]

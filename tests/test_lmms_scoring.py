"""Our figures beside lmms-eval 0.7.3's for the paper's tasks, by lmms-eval's own scoring
functions on the same (prediction, human answers) cases: where the two agree, the score both
give; where they differ, each one's score and the rule that makes the difference.

- VQAv2 / OK-VQA / VizWiz: ours is the official VQA evaluation (eval.metrics.vqa_score: the
  prediction fully normalised, the human answers only stripped of punctuation, and only when
  they disagree). lmms-eval's vqav2 (tasks/vqav2/utils.py) also runs the punctuation and the
  digit/article/contraction pass over every human answer; its ok_vqa and vizwiz_vqa run the
  whole EvalAIAnswerProcessor on both sides, whose word_tokenize first lowercases and deletes
  commas and question marks.
- COCO captions: both are pycocoevalcap's PTB tokenizer + CIDEr-D: the same number.
- Prompts: lmms-eval asks with its own suffixes; ours are the paper's.

lmms-eval's task modules import offline (no dataset, no download) but through the package
`lmms_eval.tasks`, whose __init__ builds the whole task machinery (datasets, evaluate: ~6 s).
When nothing has imported it yet, the modules are loaded beneath a bare stand-in for that
package (same __path__), removed again afterwards so a later `import lmms_eval.tasks` is the
real one (_task_modules)."""

import importlib
import importlib.util
import os
import shutil
import statistics
import sys
import types
from types import SimpleNamespace

import pytest

import yaml  # noqa: E402
from helpers import require_lmms_eval  # noqa: E402

require_lmms_eval("lmms-eval is an optional extra (pip install -e .[lmms]); without it there is nothing to compare "
                  "our scoring with")

from megatron_vl.eval import metrics  # noqa: E402
from megatron_vl.eval.tasks import Item, get_task  # noqa: E402

TASKS_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("lmms_eval").origin), "tasks")
MODULES = ("vqav2", "ok_vqa", "vizwiz_vqa", "coco_cap")


def _task_modules():
    """{name: lmms_eval.tasks.<name>.utils} for MODULES (see the module docstring)."""
    if "lmms_eval.tasks" in sys.modules:
        return {n: importlib.import_module(f"lmms_eval.tasks.{n}.utils") for n in MODULES}
    before = set(sys.modules)
    stand_in = types.ModuleType("lmms_eval.tasks")
    stand_in.__path__ = [TASKS_DIR]
    sys.modules["lmms_eval.tasks"] = stand_in
    try:
        return {n: importlib.import_module(f"lmms_eval.tasks.{n}.utils") for n in MODULES}
    finally:
        for name in set(sys.modules) - before:
            if name == "lmms_eval.tasks" or name.startswith("lmms_eval.tasks."):
                del sys.modules[name]
        sys.modules.pop("lmms_eval.tasks", None)


@pytest.fixture(scope="module")
def lmms():
    return _task_modules()


# --- VQA accuracy ------------------------------------------------------------------------

def lmms_vqav2(lmms, prediction, answers, answer_ids=True):
    """lmms-eval's vqav2 score. Its docs hold the answers as lmms-lab/VQAv2 does, as dicts with
    an answer_id; a fresh doc per call, since it normalises the doc's answers in place."""
    doc = {"question_id": 1, "answers": [dict(answer=a, **({"answer_id": i + 1} if answer_ids else {}))
                                         for i, a in enumerate(answers)]}
    return lmms["vqav2"].vqav2_process_results(doc, [prediction])["exact_match"]


def lmms_evalai(lmms, task, prediction, answers):
    """lmms-eval's ok_vqa or vizwiz_vqa score (answers are plain strings there)."""
    doc = {"question_id": 1, "answers": list(answers)}
    return getattr(lmms[task], f"{task}_process_results")(doc, [prediction])["exact_match"]


def all_scores(lmms, prediction, answers):
    return (metrics.vqa_score(prediction, answers), lmms_vqav2(lmms, prediction, answers),
            lmms_evalai(lmms, "ok_vqa", prediction, answers), lmms_evalai(lmms, "vizwiz_vqa", prediction, answers))


AGREE = [   # (prediction, the ten human answers, the score ours and all three lmms-eval tasks give)
    ("Dog.", ["dog"] * 10, 1.0),                                 # the prediction's case and period
    ("cat", ["cat"] + ["dog"] * 9, 0.3),                         # leave-one-out: 9 subsets of 1/3, 1 of 0
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),                    # 7 subsets of 3/3 (capped at 1), 3 of 2/3
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),                    # 8 of 2/3, 2 of 1/3
    ("two", ["2"] * 10, 1.0),                                    # the prediction's number word
    ("dont", ["don't"] * 10, 1.0),                               # the prediction's contraction
    ("dog", ["dog."] * 3 + ["cat"] * 7, 0.9),                    # humans disagree: their punctuation goes
    ("1,000", ["1000"] * 10, 1.0),                               # a digit group comma goes
    ("man's hat", ["man's hat"] * 10, 1.0),                      # 's stays ("man 's hat" on both EvalAI sides)
    ("shed", ["shed"] * 10, 1.0),                                # not a contraction in the official table
    ("shell", ["shell"] * 4 + ["conch"] * 6, 1.0),               # nor "shell"
    ("dog" + "." * 40, ["dog"] * 10, 0.0),                       # only 32 periods go (official: re.UNICODE as count)
    ("Unanswerable", ["unanswerable"] * 6 + ["blue"] * 4, 1.0),  # VizWiz's unanswerable items
]


@pytest.mark.parametrize("prediction,answers,score", AGREE, ids=[c[0][:12] for c in AGREE])
def test_vqa_scores_that_agree(lmms, prediction, answers, score):
    ours, vqav2, ok_vqa, vizwiz = all_scores(lmms, prediction, answers)
    assert ours == pytest.approx(score, abs=1e-12)
    assert vqav2 == ok_vqa == vizwiz == ours


DIFFER = [  # (prediction, human answers, ours, lmms-eval vqav2, lmms-eval ok_vqa and vizwiz_vqa)
    # Human answers' digits: lmms-eval maps their number words to digits as it does the
    # prediction's; the official script never touches the humans' words.
    ("2", ["two"] * 10, 0.0, 1.0, 1.0),
    # Human answers' articles, dropped by lmms-eval only (the prediction's go on both sides).
    ("the dog", ["the dog"] * 10, 0.0, 1.0, 1.0),
    # Human answers' case: lmms-eval lowercases them.
    ("yes", ["Yes"] * 10, 0.0, 1.0, 1.0),
    # Human answers' contractions: lmms-eval restores "dont" to "don't" in them too.
    ("don't", ["dont"] * 10, 0.0, 1.0, 1.0),
    # Human answers' punctuation when all ten agree: the official strips it only when they
    # disagree, lmms-eval always.
    ("dog", ["dog."] * 10, 0.0, 1.0, 1.0),
    ("1,000", ["1,000"] * 10, 0.0, 1.0, 1.0),
    # "!" beside no space becomes a space: the humans' "dog!" is "dog " for the official script;
    # lmms-eval's digit/article pass splits and rejoins their words, which drops it.
    ("dog", ["dog!"] * 3 + ["cat"] * 7, 0.0, 0.9, 0.9),
    # EvalAI's word_tokenize (ok_vqa, vizwiz_vqa only) deletes commas before the punctuation
    # rule: "red,white" -> "redwhite"; the official rule (and lmms-eval's vqav2) makes it "red white".
    ("red,white", ["red white"] * 10, 1.0, 1.0, 0.0),
    # Human answers' surrounding whitespace: the official script (and ours) compares them as
    # written, so " hot dog" never equals "hot dog"; lmms-eval splits and rejoins their words.
    ("hot dog", [" hot dog"] * 3 + ["hotdog"] * 7, 0.0, 0.9, 0.9),
]


@pytest.mark.parametrize("prediction,answers,ours,vqav2,evalai", DIFFER, ids=[c[0] for c in DIFFER])
def test_vqa_scores_that_differ_and_the_rule(lmms, prediction, answers, ours, vqav2, evalai):
    got = all_scores(lmms, prediction, answers)
    assert got == pytest.approx((ours, vqav2, evalai, evalai), abs=1e-12)


def test_leave_one_out_is_by_answer_record_in_lmms_eval_vqav2(lmms):
    """lmms-eval's vqav2 (like the official script) leaves out every answer *dict* equal to the
    one left out. lmms-lab/VQAv2's answers carry distinct answer_ids, so that is one answer, as
    ours; answers without an id (a local task's bare {"answer"}) leave out all repeats at once."""
    answers = ["dog"] * 4 + ["cat"] * 6
    assert metrics.vqa_score("dog", answers) == 1.0
    assert lmms_vqav2(lmms, "dog", answers) == 1.0
    # Leaving a "dog" out removes all four (0 matches); leaving a "cat" out leaves 4 (capped at 1).
    assert lmms_vqav2(lmms, "dog", answers, answer_ids=False) == pytest.approx(0.6, abs=1e-12)
    assert lmms_vqav2(lmms, "red", ["red"] * 3 + ["blue"] * 7, answer_ids=False) == pytest.approx(0.7, abs=1e-12)


def test_the_figure_is_a_percentage_rounded_to_2_decimals_there_a_fraction(lmms):
    """Ours prints 100 x the mean, rounded as the official script rounds; lmms-eval's
    exact_match aggregation is the plain mean in [0, 1]."""
    answers = {n: a for n, (_, a, _) in enumerate(AGREE[:4])}
    predictions = {n: p for n, (p, _, _) in enumerate(AGREE[:4])}
    theirs = statistics.mean(lmms_vqav2(lmms, predictions[n], answers[n]) for n in answers)
    assert theirs == pytest.approx(0.7, abs=1e-12)         # (1 + 0.3 + 0.9 + 0.6) / 4
    assert metrics.vqa_accuracy(predictions, answers) == 70.0


# --- prompts ------------------------------------------------------------------------------

class _TaskYaml(yaml.SafeLoader):
    """lmms-eval's task YAML, its `!function` tags read as their text."""


_TaskYaml.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_config(relpath):
    path = os.path.join(TASKS_DIR, relpath)
    with open(path) as fh:
        cfg = yaml.load(fh, Loader=_TaskYaml)
    if "include" in cfg:
        base = task_config(os.path.join(os.path.dirname(relpath), cfg.pop("include")))
        cfg = {**base, **cfg}
    return cfg


def test_prompts_lmms_eval_asks_and_ours(lmms):
    """The same question, as each asks it (lmms-eval passes the images beside the text)."""
    short = "\nAnswer the question using a single word or phrase."
    unanswerable = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + short
    item = Item(1, None, "is this a USB cable?")
    for task, yml, fn, suffix, asked in [
            ("vqav2", "vqav2/vqav2_val.yaml", "vqav2_doc_to_text", short, "is this a USB cable?"),
            ("okvqa", "ok_vqa/ok_vqa_val2014.yaml", "ok_vqa_doc_to_text", unanswerable, "is this a USB cable?"),
            # vizwiz_vqa capitalizes the question, which lowercases the rest of it.
            ("vizwiz", "vizwiz_vqa/vizwiz_vqa_val.yaml", "vizwiz_vqa_doc_to_text", unanswerable,
             "Is this a usb cable?")]:
        kwargs = task_config(yml)["lmms_eval_specific_kwargs"]["default"]
        assert kwargs == {"pre_prompt": "", "post_prompt": suffix}, task
        module = lmms[yml.split("/")[0]]
        assert getattr(module, fn)({"question": item.question}, kwargs) == asked + suffix, task
        assert get_task(task).prompt(item, []) == "<image>Question: is this a USB cable? Short answer:"
    assert task_config("coco_cap/coco_karpathy_test.yaml")["doc_to_text"] == "Describe the image briefly."
    assert task_config("coco_cap/coco2014_cap_val.yaml")["doc_to_text"] == \
        "Provide a one-sentence caption for the provided image."
    assert get_task("coco_caption").prompt(Item(42, None), []) == "<image>Caption:"


# --- CIDEr --------------------------------------------------------------------------------

REFERENCES = {
    42: ["A dog runs across the grass.", "A brown dog running on a lawn", "the dog is running outside",
         "A dog playing in a field.", "Dog runs in green grass"],
    73: ["Two men ride horses on a beach.", "people riding horses by the ocean", "Two riders on horseback at the shore",
         "Horses with riders on the sand", "two people ride horses near water"],
    74: ["A plate of food with broccoli.", "a meal of rice and broccoli on a plate",
         "Broccoli and rice on a white plate", "A dinner plate with vegetables", "food on a plate, with broccoli"],
}
CAPTIONS = {42: "A dog running on the grass.", 73: "Two people riding horses on the beach",
            74: "A plate of rice, and broccoli!"}
CIDER = 2.0159275222589588


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="PTB tokenization needs Java (both sides run Stanford's PTBTokenizer through pycocoevalcap)")
def test_cider_is_the_same_number_from_both(lmms, tmp_path):
    """lmms-eval's coco_karpathy_test (the paper's split) and coco2014_cap_val documents, through
    its own aggregation (COCO index -> PTBTokenizer -> Cider), against ours."""
    ours, _, how = metrics.cider(CAPTIONS, REFERENCES, use_java=True)
    assert how == "PTB (Stanford CoreNLP, Java)"
    assert ours == pytest.approx(CIDER, abs=1e-12)
    coco = lmms["coco_cap"]
    karpathy = [coco.coco_process_result_karpathy(
        {"filename": f"COCO_val2014_{i:012d}.jpg", "imgid": n, "sentences": REFERENCES[i]}, [CAPTIONS[i]])
        for n, i in enumerate(REFERENCES)]
    val2014 = [coco.coco_process_result(
        {"question_id": f"COCO_val2014_{i:012d}.jpg", "id": n, "answer": REFERENCES[i]}, [CAPTIONS[i]])
        for n, i in enumerate(REFERENCES)]
    args = SimpleNamespace(output_path=str(tmp_path))   # it writes a submission file there
    for docs in (karpathy, val2014):
        assert float(coco.coco_cider([d["coco_CIDEr"] for d in docs], args)) == ours
    # Our Java-less approximation of PTB gives the same tokens on these captions.
    assert metrics.cider(CAPTIONS, REFERENCES, use_java=False)[0] == ours

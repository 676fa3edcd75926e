"""lmms-eval tasks defined locally over the tests' tiny VQA files: nothing downloads.

`write_vqa_tasks(root, annotations)` reads the VQA questions/annotations our own ``vqav2`` task
reads (``<annotations>/q.json``, ``a.json``, images ``val2014/COCO_val2014_{image_id:012d}.jpg``:
the layout the tests' ``annotations`` fixture writes) through the same reader
(eval.tasks.vqa_items), and writes, under ``root/<prefix>_tasks/``:

- ``data.jsonl``: one line per question: question_id, question, image (absolute path),
  answer (the annotation's multiple_choice_answer), answers (the ten human answers),
  choices (the answer and two other words, rotated by the line's index so that the answer's
  place varies: 0, 2, 1, 0, ...) and label (the answer's index in choices);
- ``utils.py``: doc_to_visual (one RGB image, opened as our runner opens it), doc_to_text
  (our vqav2 0-shot prompt, ``<image>Question: {q} Short answer:``), the targets and the
  process_results functions;
- one YAML per task (absolute data path, so lmms-eval may run from any directory):

  ``<prefix>_vqa``  generate_until, ``until: ["\\n"]``, max_new_tokens 10 and greedy (our
                    vqav2 sampling); metrics ``exact_match`` (answer == the common answer after
                    strip) and ``vqa_accuracy`` (eval.metrics.vqa_score: our figure, item by item);
  ``<prefix>_mc``   multiple_choice over ``choices`` (continuations ``" " + choice``); metric acc;
  ``<prefix>_ll``   loglikelihood of ``" " + answer`` after the prompt; its own process_results
                    (lmms-eval hands it a one-element list: ``ll, greedy = results[0]``);
                    metrics ``nll`` (the value the model returned: mean NLL of the continuation
                    tokens) and ``acc`` (the continuation is the greedy one).

Run them with ``--include_path <returned dir> --tasks <prefix>_vqa,<prefix>_mc,<prefix>_ll``
(CLI), or TaskManager(include_path=<dir>) in process. Give each writer in one process its own
prefix: lmms-eval indexes tasks by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Union

__all__ = ["TASK_KINDS", "task_names", "write_vqa_tasks"]

TASK_KINDS = ("vqa", "mc", "ll")
"""The suffixes of the tasks written: generate_until, multiple_choice, loglikelihood."""

OTHER_CHOICES = ("star", "square", "circle")   # " star": 3 tokens in the tiny tokenizer

UTILS = '''"""doc -> visual / text / targets / metrics for the local VL-GPT tasks (megatron_vl.testing.lmms_tasks)."""

from megatron_vl.eval.metrics import vqa_score
from megatron_vl.model.directory import open_image


def doc_to_visual(doc):
    return [open_image(doc["image"], "image")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"<image>Question: {doc['question']} Short answer:"


def ll_target(doc):
    return " " + doc["answer"]


def vqa_results(doc, results):
    answer = results[0].strip()
    return {"exact_match": float(answer == doc["answer"]), "vqa_accuracy": vqa_score(answer, doc["answers"])}


def ll_results(doc, results):
    nll, greedy = results[0]
    return {"nll": float(nll), "acc": float(greedy)}
'''

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
metadata:
  - version: 0.0
"""

SPECIFIC = {
    "vqa": """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["\\n"]
  do_sample: false
  temperature: 0
process_results: !function utils.vqa_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: vqa_accuracy
    aggregation: mean
    higher_is_better: true
""",
    "mc": """output_type: multiple_choice
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "ll": """output_type: loglikelihood
doc_to_target: !function utils.ll_target
process_results: !function utils.ll_results
metric_list:
  - metric: nll
    aggregation: mean
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
}


def task_names(prefix: str = "vlgpt_local") -> List[str]:
    """The names of the tasks write_vqa_tasks(..., prefix=prefix) writes: vqa, mc, ll."""
    return [f"{prefix}_{kind}" for kind in TASK_KINDS]


def write_vqa_tasks(root: Union[str, os.PathLike], annotations: Union[str, os.PathLike],
                    prefix: str = "vlgpt_local", max_items: Optional[int] = None,
                    max_new_tokens: int = 10) -> Path:
    """Write the three tasks (module docstring) over the VQA files in `annotations` (a
    directory holding q.json, a.json and val2014/, as the tests' fixture makes it) into
    ``root/<prefix>_tasks`` and return that directory (the include path). `max_items`: the
    first N questions only. `max_new_tokens`: the generate_until task's answer length (10:
    our vqav2 task's)."""
    from ..eval.tasks import get_task
    ann = Path(annotations)
    items = get_task("vqav2").items(_files(ann))
    if max_items is not None:
        items = items[:max_items]
    out = Path(root) / f"{prefix}_tasks"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i, item in enumerate(items):
            base = [item.answer] + [c for c in OTHER_CHOICES if c != item.answer][:2]
            choices = base[i % 3:] + base[:i % 3]
            f.write(json.dumps({"question_id": item.id, "question": item.question,
                                "image": os.path.abspath(item.image), "answer": item.answer,
                                "answers": list(item.truth), "choices": choices,
                                "label": choices.index(item.answer)}) + "\n")
    (out / "utils.py").write_text(UTILS)
    for kind, name in zip(TASK_KINDS, task_names(prefix)):
        text = f"task: {name}\n" + COMMON.format(data=out / "data.jsonl") + \
            SPECIFIC[kind].replace("{max_new_tokens}", str(max_new_tokens))
        (out / f"{name}.yaml").write_text(text)
    return out


def _files(ann: Path):
    from ..eval.settings import TaskFiles
    return TaskFiles(questions=str(ann / "q.json"), annotations=str(ann / "a.json"), image_root=str(ann / "val2014"))

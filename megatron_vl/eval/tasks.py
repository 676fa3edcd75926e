"""Evaluation tasks read from their real annotation files, their prompts (zero- and k-shot)
and their scores.

Tasks and files:
- ``coco_caption``: the Karpathy split json (``dataset_coco.json``; the ``test`` split is
  evaluated, ``train`` gives k-shot support); images under ``--image-root`` at
  ``filepath/filename``. Results: ``[{"image_id", "caption"}]`` (image_id = ``cocoid``).
  Metric: CIDEr.
- ``vqav2``, ``okvqa``: VQA questions json (``{"questions": [{"question_id", "image_id",
  "question"}]}``) + annotations json (``{"annotations": [{"question_id", "answers":
  [{"answer"}], "multiple_choice_answer"}]}``); images ``--image-root/--image-pattern``
  (default ``COCO_val2014_{image_id:012d}.jpg``). Results ``[{"question_id", "answer"}]``.
  Metric: VQA accuracy.
- ``vizwiz``: the VizWiz annotations list (``[{"image", "question", "answers": [{"answer"}]}]``,
  one file); question_id = the image name. Results ``[{"image", "answer"}]``. VQA accuracy.
- ``gqa``: GQA questions json (``{qid: {"imageId", "question", "answer"}}``); images
  ``--image-root/{imageId}.jpg``. Results ``[{"questionId", "prediction"}]``. Exact match.
- ``t2i``: captions of the Karpathy ``test`` split -> generated images; FID against the real
  images (``--fid-weights``) and CLIP score (``--clip-score-model``).

Prompts, as the paper's: VQA-style ``<image>Question: {q} Short answer:`` and captions
``<image>Caption:``; a k-shot prompt puts k support examples first, each completed
(``<image>Question: {q} Short answer: {a}\\n``, ``<image>Caption: {c}\\n``), drawn without
repetition by a seeded hash of (seed, item id) from the support split.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import InputError, UsageError

VQA_TASKS = ("vqav2", "okvqa", "vizwiz", "gqa")
TASKS = ("coco_caption",) + VQA_TASKS + ("t2i",)
# The files each task reads (flags --<name>, or --<task>-<name>), for the test split.
REQUIRED_FILES = {"coco_caption": ("annotations",), "t2i": ("annotations",), "vqav2": ("questions", "annotations"),
                  "okvqa": ("questions", "annotations"), "vizwiz": ("annotations",), "gqa": ("questions",)}


class EvalFileError(InputError, ValueError):
    """An annotation or results file, or one of its records, that is not what the task reads
    (exit 1); a ValueError to Python callers."""


class FilesMismatch(UsageError, ValueError):
    """Files that each read fine but do not go together: results for other questions, questions
    without annotations (exit 2: the wrong files were named)."""


@dataclass
class Item:
    id: object                      # question_id / image_id / image name
    image: Optional[str]            # path of the image (None for t2i)
    question: str = ""              # VQA question; t2i: the caption to draw
    truth: List[str] = field(default_factory=list)   # human answers / reference captions
    answer: str = ""                # the answer a support example shows (most common human answer)


def _load(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise EvalFileError(f"{what} {path}: no such file") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise EvalFileError(f"{what} {path}: not valid json ({exc})") from None
    except OSError as exc:
        raise EvalFileError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _get(record, key: str, kinds, where: str, required: bool = True):
    """record[key], refused (naming the record) unless it is one of `kinds`: a null answer or an
    id of the wrong type would otherwise surface as an AttributeError deep in the scorer."""
    if not isinstance(record, dict):
        raise EvalFileError(f"{where}: expected a json object, found {_short(record)}")
    if key not in record:
        if not required:
            return None
        raise EvalFileError(f"{where}: no {key!r} key in {_short(record)}")
    value = record[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise EvalFileError(f"{where}: {key!r} is {_short(value)}, expected "
                            f"{' or '.join(_KIND_NAMES.get(k, k.__name__) for k in kinds)}")
    return value


def _human_answers(record, where: str) -> List[str]:
    answers = _get(record, "answers", list, where)
    if not answers:
        raise EvalFileError(f"{where}: 'answers' is empty (a question needs its human answers)")
    return [_get(x, "answer", str, f"{where}: answers[{k}]") for k, x in enumerate(answers)]


def _list_of(data, key: Optional[str], path: str, what: str, layout: str) -> list:
    """data[key] (or data itself) as a list, refused naming the file and the layout expected."""
    rows = data.get(key) if key and isinstance(data, dict) else None if key else data
    if not isinstance(rows, list):
        found = type(data).__name__ if not isinstance(data, dict) else f"an object with keys {sorted(data)[:5]}"
        raise EvalFileError(f"{what} {path}: expected {layout}, found {found}")
    return rows


def _unique(items: List[Item], path: str, what: str, noun: str) -> List[Item]:
    seen = set()
    for item in items:
        if item.id in seen:
            raise EvalFileError(f"{what} {path}: {noun} {item.id!r} appears twice")
        seen.add(item.id)
    return items


def karpathy_items(path: str, image_root: str, split: str) -> List[Item]:
    data = _load(path, "--annotations")
    images = _list_of(data, "images", path, "--annotations", "an object with an 'images' list (the Karpathy "
                      "dataset_coco.json layout)")
    out = []
    for n, im in enumerate(images):
        where = f"--annotations {path}: images[{n}]"
        if _get(im, "split", str, where, required=False) != split:
            continue
        filename = _get(im, "filename", str, where)
        filepath = _get(im, "filepath", str, where, required=False) or ""
        sentences = _get(im, "sentences", list, where, required=False) or []
        refs = [r.strip() for k, s in enumerate(sentences)
                for r in [_get(s, "raw", str, f"{where}: sentences[{k}]")] if r.strip()]
        image_id = im["cocoid"] if "cocoid" in im else im["imgid"] if "imgid" in im else filename
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise EvalFileError(f"{where}: the image id {_short(image_id)} is not an integer or a string")
        out.append(Item(image_id, os.path.join(image_root, filepath, filename), refs[0] if refs else "", refs,
                        refs[0] if refs else ""))
    return _unique(out, path, "--annotations", "image id")


def vqa_items(questions: str, annotations: str, image_root: str, pattern: str) -> List[Item]:
    qs = _list_of(_load(questions, "--questions"), "questions", questions, "--questions",
                  "an object with a 'questions' list (the VQA questions layout)")
    ann = _list_of(_load(annotations, "--annotations"), "annotations", annotations, "--annotations",
                   "an object with an 'annotations' list (the VQA annotations layout)")
    by_id = {}
    for n, a in enumerate(ann):
        qid = _get(a, "question_id", (int, str), f"--annotations {annotations}: annotations[{n}]")
        if qid in by_id:
            raise EvalFileError(f"--annotations {annotations}: question {qid!r} is annotated twice")
        by_id[qid] = (n, a)
    out = []
    for n, q in enumerate(qs):
        where = f"--questions {questions}: questions[{n}]"
        qid = _get(q, "question_id", (int, str), where)
        image_id = _get(q, "image_id", (int, str), where)
        text = _get(q, "question", str, where)
        if qid not in by_id:
            raise FilesMismatch(f"--annotations {annotations}: no annotation for question {qid!r}")
        k, a = by_id[qid]
        humans = _human_answers(a, f"--annotations {annotations}: annotations[{k}] (question {qid!r})")
        common = a.get("multiple_choice_answer")
        common = common if isinstance(common, str) and common else Counter(humans).most_common(1)[0][0]
        try:
            image = pattern.format(image_id=image_id)
        except (ValueError, KeyError, IndexError) as exc:
            raise UsageError(f"--image-pattern {pattern!r} cannot name the image of {where} (image_id "
                             f"{image_id!r}): {exc}") from None
        out.append(Item(qid, os.path.join(image_root, image), text, humans, common))
    return _unique(out, questions, "--questions", "question_id")


def vizwiz_items(annotations: str, image_root: str) -> List[Item]:
    data = _list_of(_load(annotations, "--annotations"), None, annotations, "--annotations",
                    "a json list (the VizWiz annotations layout)")
    out = []
    for n, r in enumerate(data):
        where = f"--annotations {annotations}: [{n}]"
        image, question = _get(r, "image", str, where), _get(r, "question", str, where)
        humans = _human_answers(r, where)
        out.append(Item(image, os.path.join(image_root, image), question, humans,
                        Counter(humans).most_common(1)[0][0]))
    return _unique(out, annotations, "--annotations", "image")


def gqa_items(questions: str, image_root: str) -> List[Item]:
    data = _load(questions, "--questions")
    if not isinstance(data, dict):
        raise EvalFileError(f"--questions {questions}: expected an object of questions by id (the GQA layout), "
                            f"found {type(data).__name__}")
    out = []
    for qid, q in data.items():
        where = f"--questions {questions}: question {qid!r}"
        image = _get(q, "imageId", (str, int), where)
        answer = _get(q, "answer", str, where)
        out.append(Item(qid, os.path.join(image_root, f"{image}.jpg"), _get(q, "question", str, where), [answer],
                        answer))
    return out


def missing_files(task: str, args) -> List[str]:
    """The flags `task` needs that `args` leaves unset."""
    return [f"--{name.replace('_', '-')}" for name in REQUIRED_FILES[task] if not getattr(args, name, None)]


def load_items(task: str, args, split: str = "test") -> List[Item]:
    """The evaluated items (split 'test') or the k-shot support items (split 'train')."""
    train = split == "train"
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    missing = [] if train else missing_files(task, args)
    if missing:
        raise UsageError(f"{task} needs {' and '.join(missing)} (or their per-task form --{task}-...)")
    root = args.image_root or ""     # scoring a results file needs no images
    if task in ("coco_caption", "t2i"):
        return karpathy_items(args.annotations, root, split)
    if task in ("vqav2", "okvqa"):
        q = args.train_questions if train else args.questions
        a = args.train_annotations if train else args.annotations
        if train and not (q and a):
            return []
        return vqa_items(q, a, root, args.image_pattern)
    if task == "vizwiz":
        a = args.train_annotations if train else args.annotations
        return vizwiz_items(a, root) if a else []
    if task == "gqa":
        q = args.train_questions if train else args.questions
        return gqa_items(q, root) if q else []
    raise UsageError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def support(item: Item, pool: List[Item], shots: int, seed: int) -> List[Item]:
    if shots == 0:
        return []
    candidates = [p for p in pool if p.id != item.id]
    if len(candidates) < shots:
        raise ValueError(f"{shots}-shot prompts need {shots} support examples besides the item; the support split "
                         f"has {len(candidates)}")
    return random.Random(f"{seed}:{item.id}").sample(candidates, shots)


def prompt(task: str, item: Item, examples: List[Item]) -> str:
    """The text of the prompt (one <image> per image, in order)."""
    if task == "coco_caption":
        return "".join(f"<image>Caption: {e.answer}\n" for e in examples) + "<image>Caption:"
    return "".join(f"<image>Question: {e.question} Short answer: {e.answer}\n" for e in examples) + \
        f"<image>Question: {item.question} Short answer:"


# --- scoring results files in the official formats -------------------------------------------

def read_results(task: str, path: str) -> Dict:
    """{id: answer/caption} from a results file in the task's official format."""
    rows = _load(path, "--results")
    key, value = {"coco_caption": ("image_id", "caption"), "vizwiz": ("image", "answer"),
                  "gqa": ("questionId", "prediction")}.get(task, ("question_id", "answer"))
    layout = f"a json list of {{{key!r}, {value!r}}} objects"
    rows = _list_of(rows, None, path, "--results", layout)
    if not rows:
        raise EvalFileError(f"--results {path}: no results to score (an empty list)")
    out: Dict = {}
    for n, r in enumerate(rows):
        where = f"--results {path}: [{n}]"
        rid = _get(r, key, (int, str), where)
        answer = _get(r, value, str, where)
        if rid in out:
            # The official API keeps the last silently; which answer counts would be a guess.
            raise EvalFileError(f"{where}: {key} {rid!r} has a result already (results must name each id once)")
        out[rid] = answer
    return out


def _few(ids) -> str:
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def score(task: str, results: Dict, items: List[Item], use_java: bool = True) -> Dict:
    """{metric: value, ...} of `results` ({id: text}) over `items`; results must answer exactly
    the items (as the official VQA loadRes asserts): a subset would score as if it were all."""
    from . import metrics
    truth = {i.id: i.truth for i in items}
    if not truth:
        raise EvalFileError(f"{task}: the annotation files hold no questions to score")
    if not results:
        raise EvalFileError(f"{task}: no results to score")
    unknown = [k for k in results if k not in truth]
    if unknown:
        raise FilesMismatch(f"results name {len(unknown)} id(s) the annotations lack, e.g. {_few(unknown)}")
    missing = [k for k in truth if k not in results]
    if missing:
        raise FilesMismatch(f"results answer {len(results)} of the {len(truth)} annotated questions; {len(missing)} "
                            f"missing, e.g. {_few(missing)} (a subset would be scored as the whole: answer them all, "
                            "or score the results of a --max-items N run with the same --max-items N)")
    if task == "coco_caption":
        value, _, how = metrics.cider(results, truth, use_java)
        return {"CIDEr": value, "tokenizer": how, "count": len(results)}
    if task == "gqa":
        return {"accuracy": metrics.exact_match(results, {k: v[0] for k, v in truth.items()}), "count": len(results)}
    return {"accuracy": metrics.vqa_accuracy(results, truth), "count": len(results)}


def official_line(task: str, figures: Dict) -> str:
    """What the official evaluation prints for the figure."""
    if task == "coco_caption":
        return f"CIDEr: {figures['CIDEr']:.3f}"
    return f"Overall Accuracy is: {figures['accuracy']:.02f}"

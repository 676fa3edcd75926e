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

VQA_TASKS = ("vqav2", "okvqa", "vizwiz", "gqa")
TASKS = ("coco_caption",) + VQA_TASKS + ("t2i",)


@dataclass
class Item:
    id: object                      # question_id / image_id / image name
    image: Optional[str]            # path of the image (None for t2i)
    question: str = ""              # VQA question; t2i: the caption to draw
    truth: List[str] = field(default_factory=list)   # human answers / reference captions
    answer: str = ""                # the answer a support example shows (most common human answer)


def _load(path: str, what: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except ValueError as exc:
        raise ValueError(f"{what} {path}: not valid json ({exc})") from None


def karpathy_items(path: str, image_root: str, split: str) -> List[Item]:
    data = _load(path, "--annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"--annotations {path}: no 'images' list (the Karpathy dataset_coco.json layout)")
    out = []
    for im in data["images"]:
        if im.get("split") != split:
            continue
        refs = [s["raw"].strip() for s in im.get("sentences", []) if s.get("raw", "").strip()]
        image_id = im.get("cocoid", im.get("imgid", im["filename"]))
        out.append(Item(image_id, os.path.join(image_root, im.get("filepath", ""), im["filename"]), refs[0] if refs
                        else "", refs, refs[0] if refs else ""))
    return out


def vqa_items(questions: str, annotations: str, image_root: str, pattern: str) -> List[Item]:
    qs = _load(questions, "--questions")
    ann = _load(annotations, "--annotations")
    by_id = {a["question_id"]: a for a in ann.get("annotations", [])}
    out = []
    for q in qs.get("questions", []):
        a = by_id.get(q["question_id"])
        if a is None:
            raise ValueError(f"--annotations {annotations}: no annotation for question {q['question_id']}")
        humans = [x["answer"] for x in a["answers"]]
        common = a.get("multiple_choice_answer") or Counter(humans).most_common(1)[0][0]
        out.append(Item(q["question_id"], os.path.join(image_root, pattern.format(image_id=q["image_id"])),
                        q["question"], humans, common))
    return out


def vizwiz_items(annotations: str, image_root: str) -> List[Item]:
    data = _load(annotations, "--annotations")
    if not isinstance(data, list):
        raise ValueError(f"--annotations {annotations}: a VizWiz annotation file is a json list")
    return [Item(r["image"], os.path.join(image_root, r["image"]), r["question"],
                 [x["answer"] for x in r["answers"]], Counter(x["answer"] for x in r["answers"]).most_common(1)[0][0])
            for r in data]


def gqa_items(questions: str, image_root: str) -> List[Item]:
    data = _load(questions, "--questions")
    return [Item(qid, os.path.join(image_root, f"{q['imageId']}.jpg"), q["question"], [q["answer"]], q["answer"])
            for qid, q in data.items()]


def load_items(task: str, args, split: str = "test") -> List[Item]:
    """The evaluated items (split 'test') or the k-shot support items (split 'train')."""
    train = split == "train"
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
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


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
    try:
        return {r[key]: r[value] for r in rows}
    except (KeyError, TypeError):
        raise ValueError(f"--results {path}: expected a list of {{{key!r}, {value!r}}} objects") from None


def score(task: str, results: Dict, items: List[Item], use_java: bool = True) -> Dict:
    """{metric: value, ...} of `results` ({id: text}) over `items`."""
    from . import metrics
    truth = {i.id: i.truth for i in items}
    missing = [k for k in results if k not in truth]
    if missing:
        raise ValueError(f"results name {len(missing)} id(s) the annotations lack, e.g. {missing[0]!r}")
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

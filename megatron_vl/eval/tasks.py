"""The evaluation tasks, one registered class each, read from their real annotation files.

Tasks and files (the TaskFiles fields each reads; tools/evaluate.py's flags of the same names):
- ``coco_caption``: the Karpathy split json (``dataset_coco.json``; the ``test`` split is
  evaluated, ``train`` gives k-shot support); images under ``image_root`` at
  ``filepath/filename``. Results: ``[{"image_id", "caption"}]`` (image_id = ``cocoid``).
  Metric: CIDEr.
- ``vqav2``, ``okvqa``: VQA questions json (``{"questions": [{"question_id", "image_id",
  "question"}]}``) + annotations json (``{"annotations": [{"question_id", "answers":
  [{"answer"}], "multiple_choice_answer"}]}``); images ``image_root/image_pattern``
  (default ``COCO_val2014_{image_id:012d}.jpg``). Results ``[{"question_id", "answer"}]``.
  Metric: VQA accuracy.
- ``vizwiz``: the VizWiz annotations list (``[{"image", "question", "answers": [{"answer"}]}]``,
  one file); question_id = the image name. Results ``[{"image", "answer"}]``. VQA accuracy.
- ``gqa``: GQA questions json (``{qid: {"imageId", "question", "answer"}}``); images
  ``image_root/{imageId}.jpg``. Results ``[{"questionId", "prediction"}]``. Exact match.
- ``t2i``: captions of the Karpathy ``test`` split -> generated images; FID against the real
  images (option ``fid_weights``) and CLIP score (option ``clip_score_model``), from statistics
  that stream (no image is kept; option ``generated_images_dir`` writes them to disk).

Prompts, as the paper's: VQA-style ``<image>Question: {q} Short answer:`` and captions
``<image>Caption:``; a k-shot prompt puts k support examples first, each completed
(``<image>Question: {q} Short answer: {a}\\n``, ``<image>Caption: {c}\\n``), drawn without
repetition by a seeded hash of (seed, item id) from the support split.

A new benchmark is one more ``@register``-ed ``EvalTask`` subclass (registry.py says what it
declares); the tool's choices and flags, and the runner, follow from the registry.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Dict, List

from ..errors import UsageError
from . import metrics
from .records import EvalFileError, FilesMismatch, Item, get, human_answers, list_of, load_json, short, unique
from .registry import REGISTRY, EvalTask, register
from .settings import TaskFiles, TaskOption

__all__ = ["EvalFileError", "FilesMismatch", "Item", "EvalTask", "REGISTRY", "register", "get_task", "task_names",
           "support", "prompt"]


def karpathy_items(path: str, image_root: str, split: str) -> List[Item]:
    what = "annotations file"
    images = list_of(load_json(path, what), "images", path, what, "an object with an 'images' list (the Karpathy "
                     "dataset_coco.json layout)")
    out = []
    for n, im in enumerate(images):
        where = f"{what} {path}: images[{n}]"
        if get(im, "split", str, where, required=False) != split:
            continue
        filename = get(im, "filename", str, where)
        filepath = get(im, "filepath", str, where, required=False) or ""
        sentences = get(im, "sentences", list, where, required=False) or []
        refs = [r.strip() for k, s in enumerate(sentences)
                for r in [get(s, "raw", str, f"{where}: sentences[{k}]")] if r.strip()]
        image_id = im["cocoid"] if "cocoid" in im else im["imgid"] if "imgid" in im else filename
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise EvalFileError(f"{where}: the image id {short(image_id)} is not an integer or a string")
        out.append(Item(image_id, os.path.join(image_root, filepath, filename), refs[0] if refs else "", refs,
                        refs[0] if refs else ""))
    return unique(out, path, what, "image id")


def vqa_items(questions: str, annotations: str, image_root: str, pattern: str, split: str = "test") -> List[Item]:
    train = "train " if split == "train" else ""
    q_what, a_what = f"{train}questions file", f"{train}annotations file"
    qs = list_of(load_json(questions, q_what), "questions", questions, q_what,
                 "an object with a 'questions' list (the VQA questions layout)")
    ann = list_of(load_json(annotations, a_what), "annotations", annotations, a_what,
                  "an object with an 'annotations' list (the VQA annotations layout)")
    by_id = {}
    for n, a in enumerate(ann):
        qid = get(a, "question_id", (int, str), f"{a_what} {annotations}: annotations[{n}]")
        if qid in by_id:
            raise EvalFileError(f"{a_what} {annotations}: question {qid!r} is annotated twice")
        by_id[qid] = (n, a)
    out = []
    for n, q in enumerate(qs):
        where = f"{q_what} {questions}: questions[{n}]"
        qid = get(q, "question_id", (int, str), where)
        image_id = get(q, "image_id", (int, str), where)
        text = get(q, "question", str, where)
        if qid not in by_id:
            raise FilesMismatch(f"{a_what} {annotations}: no annotation for question {qid!r}")
        k, a = by_id[qid]
        humans = human_answers(a, f"{a_what} {annotations}: annotations[{k}] (question {qid!r})")
        common = a.get("multiple_choice_answer")
        common = common if isinstance(common, str) and common else Counter(humans).most_common(1)[0][0]
        try:
            image = pattern.format(image_id=image_id)
        except (ValueError, KeyError, IndexError) as exc:
            raise UsageError(f"image file pattern {pattern!r} cannot name the image of {where} (image_id "
                             f"{image_id!r}): {exc}") from None
        out.append(Item(qid, os.path.join(image_root, image), text, humans, common))
    return unique(out, questions, q_what, "question_id")


def vizwiz_items(annotations: str, image_root: str, what: str = "annotations file") -> List[Item]:
    data = list_of(load_json(annotations, what), None, annotations, what, "a json list (the VizWiz annotations layout)")
    out = []
    for n, r in enumerate(data):
        where = f"{what} {annotations}: [{n}]"
        image, question = get(r, "image", str, where), get(r, "question", str, where)
        humans = human_answers(r, where)
        out.append(Item(image, os.path.join(image_root, image), question, humans,
                        Counter(humans).most_common(1)[0][0]))
    return unique(out, annotations, what, "image")


def gqa_items(questions: str, image_root: str, what: str = "questions file") -> List[Item]:
    data = load_json(questions, what)
    if not isinstance(data, dict):
        raise EvalFileError(f"{what} {questions}: expected an object of questions by id (the GQA layout), "
                            f"found {type(data).__name__}")
    out = []
    for qid, q in data.items():
        where = f"{what} {questions}: question {qid!r}"
        image = get(q, "imageId", (str, int), where)
        answer = get(q, "answer", str, where)
        out.append(Item(qid, os.path.join(image_root, f"{image}.jpg"), get(q, "question", str, where), [answer],
                        answer))
    return out


# --- the tasks ----------------------------------------------------------------------------

@register
class CocoCaption(EvalTask):
    """COCO captions on the Karpathy split, scored by CIDEr-D."""
    name = "coco_caption"
    reads = ("annotations", "image_root")
    requires = ("annotations",)
    support = "the Karpathy file's train images"
    answer_tokens = 30
    results_layout = ("image_id", "caption")

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        return karpathy_items(files.annotations, files.image_root or "", split) if files.annotations else []

    def prompt(self, item: Item, examples: List[Item]) -> str:
        return "".join(f"<image>Caption: {e.answer}\n" for e in examples) + "<image>Caption:"

    def figures(self, results, truth, use_java):
        value, _, how = metrics.cider(results, truth, use_java)
        return {"CIDEr": value, "tokenizer": how, "count": len(results)}

    def official_line(self, figures: Dict) -> str:
        return f"CIDEr: {figures['CIDEr']:.3f}"


@register
class VQAv2(EvalTask):
    """VQAv2: questions and annotations files, VQA accuracy."""
    name = "vqav2"
    reads = ("questions", "annotations", "train_questions", "train_annotations", "image_root", "image_pattern")
    requires = ("questions", "annotations")
    support = "the train questions and train annotations files"

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        train = split == "train"
        q = files.train_questions if train else files.questions
        a = files.train_annotations if train else files.annotations
        return vqa_items(q, a, files.image_root or "", files.image_pattern, split) if q and a else []


@register
class OKVQA(VQAv2):
    """OK-VQA: the VQAv2 layout and metric."""
    name = "okvqa"


@register
class VizWiz(EvalTask):
    """VizWiz: one annotations list (the image name is the question's id), VQA accuracy."""
    name = "vizwiz"
    reads = ("annotations", "train_annotations", "image_root")
    requires = ("annotations",)
    support = "the train annotations file"
    results_layout = ("image", "answer")

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        if split == "train":
            a, what = files.train_annotations, "train annotations file"
        else:
            a, what = files.annotations, "annotations file"
        return vizwiz_items(a, files.image_root or "", what) if a else []


@register
class GQA(EvalTask):
    """GQA: questions by id with their answer, exact match."""
    name = "gqa"
    reads = ("questions", "train_questions", "image_root")
    requires = ("questions",)
    support = "the train questions file"
    results_layout = ("questionId", "prediction")

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        if split == "train":
            q, what = files.train_questions, "train questions file"
        else:
            q, what = files.questions, "questions file"
        return gqa_items(q, files.image_root or "", what) if q else []

    def figures(self, results, truth, use_java):
        return {"accuracy": metrics.exact_match(results, {k: v[0] for k, v in truth.items()}), "count": len(results)}


@register
class TextToImage(EvalTask):
    """Text-to-image on the Karpathy test captions: FID against the real images, CLIP score."""
    name = "t2i"
    reads = ("annotations", "image_root")
    requires = ("annotations",)
    generates = "images"
    results_layout = None
    options = (
        TaskOption("fid_weights", "t2i: torch-fidelity's Inception-v3 weights file (never downloaded)", is_path=True),
        TaskOption("clip_score_model", "t2i: a local CLIPModel directory for the CLIP score", is_path=True),
        TaskOption("diffusion_steps", "t2i: denoising steps of the diffusion decoder", int, 50, minimum=1),
        TaskOption("guidance_scale", "t2i: classifier-free guidance scale of the diffusion decoder", float, 7.5),
        TaskOption("t2i_size", "t2i: generated image size (default: the UNet's)", int, None, minimum=1),
        TaskOption("fid_feature", "a feature extractor module for FID instead of Inception-v3 (tests)", object,
                   cli=False),
        TaskOption("generated_images_dir", "t2i: also write each generated image to this directory as <item id>.png "
                   "(an existing file of that name is replaced)"),
    )

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        return karpathy_items(files.annotations, files.image_root or "", split) if split == "test" else []


# --- looking tasks up ---------------------------------------------------------------------

def task_names() -> List[str]:
    """The registered tasks' names, in registration order."""
    return list(REGISTRY)


def get_task(name: str) -> EvalTask:
    """The task registered as `name`."""
    if isinstance(name, EvalTask):
        return name
    if name not in REGISTRY:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def support(item: Item, pool: List[Item], shots: int, seed: int) -> List[Item]:
    """The `shots` support examples of `item`'s prompt, drawn from `pool` (never the item)."""
    if shots == 0:
        return []
    candidates = [p for p in pool if p.id != item.id]
    if len(candidates) < shots:
        raise ValueError(f"{shots}-shot prompts need {shots} support examples besides the item; the support split "
                         f"has {len(candidates)}")
    return random.Random(f"{seed}:{item.id}").sample(candidates, shots)


# --- by task name (the few-shot prompt as the tests read it) ---------------------------------

def prompt(task: str, item: Item, examples: List[Item]) -> str:
    return get_task(task).prompt(item, examples)

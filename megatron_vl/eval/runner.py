"""Running the evaluation tasks with a model: prompts built per item and shot count, answers
generated in batches (greedy, text only, stopped at a newline), items split over the
data-parallel ranks and the answers gathered before scoring; a task that generates images
(text-to-image) gets an image per caption, scored by FID and CLIP score."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..inference.generation import Generator
from ..inference.sampling import GenerationError, Sampling
from .records import EvalFileError, Item
from .registry import EvalTask
from .settings import EvalSettings, as_eval_settings, refuse_namespace
from .tasks import get_task, support


def _image(path: str):
    import os
    from ..model.directory import open_image
    if not os.path.isfile(path):
        raise EvalFileError(f"image {path}: no such file (check the image root and the image file pattern)")
    return open_image(path, "image")   # a damaged image: one line naming it


def _gather(values: Dict) -> Dict:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    out: Dict = {}
    for p in parts:
        out.update(p)
    return out


def answer_items(gen: Generator, task: EvalTask, items: List[Item], pool: List[Item], shots: int, seed: int,
                 batch_size: int, rank: int, world: int, progress=None) -> Dict:
    """{item id: generated text} for every item (each rank answers items[rank::world])."""
    task = get_task(task)
    mine = items[rank::world]
    sampling = Sampling(max_new_tokens=task.answer_tokens, stop=("\n",), text_only=True)
    answers = {}
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        prompts = []
        for item in batch:
            examples = support(item, pool, shots, seed)
            images = [_image(e.image) for e in examples] + [_image(item.image)]
            try:
                prompts.append(gen.prompt(task.prompt(item, examples), images))
            except GenerationError as exc:   # e.g. k shots beyond the model's positions
                raise GenerationError(f"{task.name} item {item.id!r}, {shots}-shot: {exc}") from None
        for item, out in zip(batch, gen.generate(prompts, sampling)):
            answers[item.id] = out.text.strip()
        if progress is not None:
            progress.update(len(batch))
    return _gather(answers)


def text_to_image(gen: Generator, task: EvalTask, items: List[Item], settings: EvalSettings, rank: int, world: int,
                  progress=None) -> Dict:
    """Generated images for the captions; FID against the real images, CLIP score (the task's
    options fid_weights / fid_feature, clip_score_model, t2i_size, diffusion_steps, guidance_scale)."""
    import numpy as np
    from . import metrics
    task = get_task(task)
    option = task.option_values(settings)
    decoder = gen.decoder()
    real, fake, captions = [], [], []
    sampling = Sampling(max_new_tokens=gen.model.config["num_image_tokens"] + 2, text_to_image=True)
    mine = items[rank::world]
    for start in range(0, len(mine), settings.batch_size):
        batch = mine[start:start + settings.batch_size]
        outs = gen.generate([gen.prompt(item.question) for item in batch], sampling)
        for item, o in zip(batch, outs):
            if not o.images:   # the caption left too few positions for a whole image
                raise GenerationError(f"{task.name} item {item.id!r}: no complete image was generated "
                                      f"({o.stopped_by})")
        embeds = torch.stack([o.images[0] for o in outs])
        pictures = decoder.decode(embeds, "both", option["t2i_size"], option["t2i_size"], option["diffusion_steps"],
                                  option["guidance_scale"], settings.seed)
        for item, picture in zip(batch, pictures):
            real.append(torch.from_numpy(np.asarray(_image(item.image).resize(picture.size))).permute(2, 0, 1))
            fake.append(torch.from_numpy(np.asarray(picture)).permute(2, 0, 1))
            captions.append(item.question)
        if progress is not None:
            progress.update(len(batch))
    gathered = _gather({rank: (real, fake, captions)})
    real = [t for r in sorted(gathered) for t in gathered[r][0]]
    fake = [t for r in sorted(gathered) for t in gathered[r][1]]
    captions = [c for r in sorted(gathered) for c in gathered[r][2]]
    figures = {"count": len(fake)}
    figures["FID"] = metrics.fid(real, fake, weights=option["fid_weights"], feature=option["fid_feature"])
    if option["clip_score_model"]:
        figures["CLIP score"] = metrics.clip_score(fake, captions, option["clip_score_model"])
    return figures


def evaluate(gen: Generator, task: str, settings: EvalSettings, shots_list: Sequence[int], rank: int = 0,
             world: int = 1, progress_factory=None) -> Dict:
    """{"shots": {k: figures}, "answers": {k: {id: text}}} for one task (a registered name or
    an EvalTask). `settings` is EvalSettings (or one flat record of its fields, see
    settings.as_eval_settings); never an argparse Namespace."""
    task = get_task(task)
    refuse_namespace(settings, "EvalSettings")
    settings = as_eval_settings(settings, [o.name for o in task.options])
    items = task.items(settings.files)
    if settings.max_items:
        items = items[:settings.max_items]
    if not items:
        raise EvalFileError(f"{task.name}: no items to evaluate in the given files")
    out: Dict = {"shots": {}, "answers": {}}
    if task.generates == "images":
        bar = progress_factory(len(items[rank::world]), f"{task.name}") if progress_factory else None
        out["shots"][0] = text_to_image(gen, task, items, settings, rank, world, bar)
        return out
    pool = task.items(settings.files, "train") if max(shots_list) > 0 else []
    for shots in shots_list:
        if shots and not pool:
            raise ValueError(f"{task.name}: {shots}-shot prompts need the support split ({task.support or 'none'})")
        bar = progress_factory(len(items[rank::world]), f"{task.name} {shots}-shot") if progress_factory else None
        answers = answer_items(gen, task, items, pool, shots, settings.seed, settings.batch_size, rank, world, bar)
        if bar is not None:
            bar.close()
        out["answers"][shots] = answers
        out["shots"][shots] = task.score(answers, items, use_java=settings.use_java)
    return out


def table(results: Dict[str, Dict]) -> str:
    """One screen: a row per task and metric, a column per shot count."""
    shots = sorted({k for r in results.values() for k in r["shots"]})
    lines = [f"{'task':<14}{'metric':<12}" + "".join(f"{f'{k}-shot':>10}" for k in shots)]
    for task, r in results.items():
        metrics = [m for m in next(iter(r["shots"].values())) if m not in ("count", "tokenizer")]
        for m in metrics:
            cells = "".join(f"{r['shots'][k][m]:>10.2f}" if k in r["shots"] else f"{'-':>10}" for k in shots)
            lines.append(f"{task:<14}{m:<12}{cells}")
    return "\n".join(lines)

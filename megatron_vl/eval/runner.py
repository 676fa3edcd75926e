"""Running the evaluation tasks with a model: prompts built per item and shot count, answers
generated in batches (greedy, text only, stopped at a newline), items split over the
data-parallel ranks and the answers gathered before scoring; a task that generates images
(text-to-image) gets an image per caption, scored by FID and CLIP score from statistics each
rank updates batch by batch and that are summed across the ranks (no image is kept)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..errors import UsageError
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


def _group(group, rank: int, world: int):
    """The process group of the `world` ranks items are split over: None for one rank; the
    launcher's default group when several ranks name none (what tools/evaluate.py starts)."""
    import torch.distributed as dist
    if world == 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(f"evaluating on {world} ranks needs an initialised torch.distributed process group")
    group = dist.group.WORLD if group is None else group
    if (dist.get_world_size(group), dist.get_rank(group)) != (world, rank):
        raise UsageError(f"evaluation rank {rank} of {world}, but this process is rank {dist.get_rank(group)} of "
                         f"{dist.get_world_size(group)} in the process group passed in")
    return group


def _gather(values: Dict, group, rank: int, world: int) -> Dict:
    import torch.distributed as dist
    group = _group(group, rank, world)
    if group is None:
        return values
    parts = [None] * world
    dist.all_gather_object(parts, values, group=group)
    out: Dict = {}
    for p in parts:
        out.update(p)
    return out


def answer_items(gen: Generator, task: EvalTask, items: List[Item], pool: List[Item], shots: int, seed: int,
                 batch_size: int, rank: int, world: int, progress=None, group=None) -> Dict:
    """{item id: generated text} for every item (each rank answers items[rank::world], the
    answers gathered over `group`)."""
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
    return _gather(answers, group, rank, world)


def text_to_image(gen: Generator, task: EvalTask, items: List[Item], settings: EvalSettings, rank: int, world: int,
                  progress=None, group=None) -> Dict:
    """FID against the real images and CLIP score of an image generated per caption (the task's
    options fid_weights / fid_feature, clip_score_model, t2i_size, diffusion_steps,
    guidance_scale, generated_images_dir). Streams: each rank draws its items' images a batch at
    a time, updates the statistics and drops the batch (generated_images_dir: written there,
    one PNG per item id, not kept); the statistics are summed over `group` at the end."""
    import os
    from . import metrics
    task = get_task(task)
    option = task.option_values(settings)
    group = _group(group, rank, world)
    # Built first: a missing Inception or CLIP file fails before any image is generated.
    fid = metrics.StreamingFID(option["fid_weights"], option["fid_feature"], gen.device)
    clip = metrics.StreamingClipScore(option["clip_score_model"], gen.device) if option["clip_score_model"] else None
    out_dir = option["generated_images_dir"]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    decoder = gen.decoder()
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
                                  option["guidance_scale"],
                                  # per item (its place in the task): the same picture on any number of ranks
                                  [settings.seed + rank + world * (start + j) for j in range(len(batch))])
        fake = torch.stack([_pixels(p) for p in pictures])
        fid.update(torch.stack([_pixels(_image(item.image).resize(p.size)) for item, p in zip(batch, pictures)]),
                   real=True)
        fid.update(fake, real=False)
        if clip is not None:
            clip.update(fake, [item.question for item in batch])
        if out_dir:
            for item, picture in zip(batch, pictures):
                picture.save(os.path.join(out_dir, f"{_file_name(item.id)}.png"))
        if progress is not None:
            progress.update(len(batch))
    real, generated = fid.reduced(group)
    figures = {"count": generated.count, "FID": metrics.frechet_distance(real, generated)}
    if clip is not None:
        figures["CLIP score"] = clip.compute(group)
    return figures


def _pixels(picture) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] (a copy: PIL's buffer is read-only)."""
    import numpy as np
    return torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)


def _file_name(item_id) -> str:
    import re
    return re.sub(r"[^\w.-]", "_", str(item_id))


def evaluate(gen: Generator, task: str, settings: EvalSettings, shots_list: Sequence[int], rank: int = 0,
             world: int = 1, progress_factory=None, group=None) -> Dict:
    """{"shots": {k: figures}, "answers": {k: {id: text}}} for one task (a registered name or
    an EvalTask). `settings` is EvalSettings (or one flat record of its fields, see
    settings.as_eval_settings); never an argparse Namespace. `rank` of `world` ranks share the
    items; `group` is their process group (None: the default group when world > 1)."""
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
        out["shots"][0] = text_to_image(gen, task, items, settings, rank, world, bar, group)
        return out
    pool = task.items(settings.files, "train") if max(shots_list) > 0 else []
    for shots in shots_list:
        if shots and not pool:
            raise ValueError(f"{task.name}: {shots}-shot prompts need the support split ({task.support or 'none'})")
        bar = progress_factory(len(items[rank::world]), f"{task.name} {shots}-shot") if progress_factory else None
        answers = answer_items(gen, task, items, pool, shots, settings.seed, settings.batch_size, rank, world, bar,
                               group)
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

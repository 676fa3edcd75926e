"""Running the evaluation tasks with a model: prompts built per item and shot count, answers
generated in batches (greedy, text only, stopped at a newline), items split over the
data-parallel ranks and the answers gathered before scoring; text-to-image generates an
image per caption and scores FID and CLIP score."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..inference.generation import GenerationError, Generator, Sampling
from .tasks import EvalFileError, Item, load_items, prompt, score, support

ANSWER_TOKENS = {"coco_caption": 30}
DEFAULT_ANSWER_TOKENS = 10


def _image(path: str):
    import os
    from ..model.directory import open_image
    if not os.path.isfile(path):
        raise EvalFileError(f"image {path}: no such file (check --image-root / --image-pattern)")
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


def answer_items(gen: Generator, task: str, items: List[Item], pool: List[Item], shots: int, seed: int,
                 batch_size: int, rank: int, world: int, progress=None) -> Dict:
    """{item id: generated text} for every item (each rank answers items[rank::world])."""
    mine = items[rank::world]
    sampling = Sampling(max_new_tokens=ANSWER_TOKENS.get(task, DEFAULT_ANSWER_TOKENS), stop=("\n",), text_only=True)
    answers = {}
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        prompts = []
        for item in batch:
            examples = support(item, pool, shots, seed)
            images = [_image(e.image) for e in examples] + [_image(item.image)]
            try:
                prompts.append(gen.prompt(prompt(task, item, examples), images))
            except GenerationError as exc:   # e.g. k shots beyond the model's positions
                raise GenerationError(f"{task} item {item.id!r}, {shots}-shot: {exc}") from None
        for item, out in zip(batch, gen.generate(prompts, sampling)):
            answers[item.id] = out.text.strip()
        if progress is not None:
            progress.update(len(batch))
    return _gather(answers)


def text_to_image(gen: Generator, items: List[Item], args, rank: int, world: int, progress=None) -> Dict:
    """Generated images for the captions; FID against the real images, CLIP score."""
    import numpy as np
    from . import metrics
    decoder = gen.decoder()
    real, fake, captions = [], [], []
    sampling = Sampling(max_new_tokens=gen.model.config["num_image_tokens"] + 2, text_to_image=True)
    mine = items[rank::world]
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        outs = gen.generate([gen.prompt(item.question) for item in batch], sampling)
        for item, o in zip(batch, outs):
            if not o.images:   # the caption left too few positions for a whole image
                raise GenerationError(f"t2i item {item.id!r}: no complete image was generated ({o.stopped_by})")
        embeds = torch.stack([o.images[0] for o in outs])
        pictures = decoder.decode(embeds, "both", args.t2i_size, args.t2i_size, args.diffusion_steps,
                                  args.guidance_scale, args.seed)
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
    figures["FID"] = metrics.fid(real, fake, weights=args.fid_weights, feature=getattr(args, "fid_feature", None))
    if args.clip_score_model:
        figures["CLIP score"] = metrics.clip_score(fake, captions, args.clip_score_model)
    return figures


def evaluate(gen: Generator, task: str, args, shots_list: Sequence[int], rank: int = 0, world: int = 1,
             progress_factory=None) -> Dict:
    """{"shots": {k: figures}, "answers": {k: {id: text}}} for one task."""
    items = load_items(task, args)
    if args.max_items:
        items = items[:args.max_items]
    if not items:
        raise EvalFileError(f"{task}: no items to evaluate in the given files")
    out: Dict = {"shots": {}, "answers": {}}
    if task == "t2i":
        bar = progress_factory(len(items[rank::world]), f"{task}") if progress_factory else None
        out["shots"][0] = text_to_image(gen, items, args, rank, world, bar)
        return out
    pool = load_items(task, args, "train") if max(shots_list) > 0 else []
    for shots in shots_list:
        if shots and not pool:
            raise ValueError(f"{task}: {shots}-shot prompts need the support split (the train questions/annotations "
                             f"files; coco_caption: the Karpathy file's train images)")
        bar = progress_factory(len(items[rank::world]), f"{task} {shots}-shot") if progress_factory else None
        answers = answer_items(gen, task, items, pool, shots, args.seed, args.batch_size, rank, world, bar)
        if bar is not None:
            bar.close()
        out["answers"][shots] = answers
        out["shots"][shots] = score(task, answers, items, use_java=not args.no_java)
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

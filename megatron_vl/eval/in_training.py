"""Evaluation tasks during pretraining and finetuning (--eval-tasks at --eval-interval),
on the training model itself, whatever its TP / DP / ZeRO layout (not pipelines).

Every rank runs every item in lockstep (ZeRO-3 gathers parameters in each forward, and TP
ranks must run the same forwards); the generated token of each step is rank 0's,
broadcast, so all ranks see the same sequence. Decoding is greedy, text only, stopped at a
newline or end of sequence, recomputing the whole prefix each step (no KV cache: eval sets
here are small, a few dozen items). Every rank scores; rank 0 prints.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Dict, List

import torch
import torch.distributed as dist

from ..inference.generation import Prompt, build_prompt
from .runner import ANSWER_TOKENS, DEFAULT_ANSWER_TOKENS, _image
from .tasks import TASKS, load_items, prompt, score, support

FILE_KEYS = ("questions", "annotations", "train_questions", "train_annotations", "image_root", "image_pattern")


def read_task_files(path: str, tasks: List[str]) -> Dict[str, SimpleNamespace]:
    """--eval-tasks-config: {task: {questions, annotations, train_questions, train_annotations,
    image_root, image_pattern}} (tools/evaluate.py's per-task flags, as JSON)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--eval-tasks-config {path}: {exc}") from None
    out = {}
    for task in tasks:
        if task not in TASKS or task == "t2i":
            raise ValueError(f"--eval-tasks {task}: training-time tasks are {', '.join(t for t in TASKS if t != 't2i')}")
        if task not in data:
            raise ValueError(f"--eval-tasks-config {path}: no entry for task {task!r}")
        unknown = set(data[task]) - set(FILE_KEYS)
        if unknown:
            raise ValueError(f"--eval-tasks-config {path}: {task}: unknown keys {sorted(unknown)}")
        values = {k: data[task].get(k) for k in FILE_KEYS}
        values["image_pattern"] = values["image_pattern"] or "COCO_val2014_{image_id:012d}.jpg"
        out[task] = SimpleNamespace(**values)
    return out


class TrainingEvaluator:
    def __init__(self, cfg, engine, device, tokenizer_meta: Dict, image_token_ids):
        from ..data.tokenizer import Tokenizer
        from ..model.image_tokenizer import ImageTokenizer, load_image_processor
        t = cfg.training
        self.cfg, self.engine, self.device = cfg, engine, device
        self.tasks = read_task_files(t.eval_tasks_config, t.eval_tasks)
        self.tokenizer = Tokenizer(tokenizer_meta["type"], tokenizer_meta["model"])
        self.img, self.img_end = image_token_ids
        if not t.eval_image_tokenizer:
            raise ValueError("--eval-tasks needs --eval-image-tokenizer (the image tokenizer the data's features "
                             "came from)")
        self.image_tokenizer = ImageTokenizer.from_pretrained(t.eval_image_tokenizer).to(device).eval()
        self.processor = load_image_processor(t.eval_image_tokenizer)
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _embeddings(self, images):
        if not images:
            return []
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            return list(self.image_tokenizer(pixels).float())

    def _step(self, p: Prompt, dtype) -> int:
        """The greedy next token after p (rank 0's, broadcast)."""
        n = len(p.tokens)
        d = self.cfg.model.visual_embed_dim
        visual = torch.stack([v if v is not None else torch.zeros(d) for v in p.visual])[None].to(self.device, dtype)
        batch = {"tokens": torch.tensor([[t if v is None else 0 for t, v in zip(p.tokens, p.visual)]],
                                        device=self.device),
                 "visual_embeds": visual,
                 "visual_mask": torch.tensor([[v is not None for v in p.visual]], device=self.device),
                 "position_ids": torch.arange(n, device=self.device)[None], "segment_ids": None}
        local, _ = self.engine(batch)
        logits = self.engine.module.head.full_logits(local)[0, -1, :self.cfg.model.vocab_size].float()
        logits[[self.img, self.img_end]] = float("-inf")   # answers are text
        token = logits.argmax().reshape(1).to(self.device)
        if dist.is_initialized():
            dist.broadcast(token, 0)
        return int(token)

    def _answer(self, p: Prompt, max_new: int, dtype) -> str:
        out: List[int] = []
        eos = self.tokenizer.eod_id
        # Special tokens are no part of an answer's text (an HF tokenizer's decode would spell
        # them out, "<s>" in a VQA answer scores 0); EOS ends it, as in generation.py.
        special = {eos, self.tokenizer.bos_id, self.img, self.img_end}
        for _ in range(max_new):
            token = self._step(p, dtype)
            if token == eos:
                break
            out.append(token)
            p = Prompt(p.tokens + [token], p.visual + [None])
            if "\n" in self.tokenizer.decode([t for t in out if t not in special]):
                break
        return self.tokenizer.decode([t for t in out if t not in special]).split("\n")[0].strip()

    @torch.no_grad()
    def run(self) -> Dict[str, Dict]:
        t = self.cfg.training
        dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
        bos = self.tokenizer.bos_id if self.tokenizer.bos_id is not None and self.tokenizer.bos_id >= 0 else None
        results = {}
        for task, files in self.tasks.items():
            items = load_items(task, files)[:t.eval_max_items]
            pool = load_items(task, files, "train") if max(t.eval_shots) > 0 else []
            results[task] = {}
            for shots in t.eval_shots:
                answers = {}
                for item in items:
                    examples = support(item, pool, shots, t.seed)
                    text = prompt(task, item, examples)
                    images = [_image(e.image) for e in examples] + [_image(item.image)]
                    p = build_prompt(text, self.tokenizer.encode, self._embeddings(images), self.img, self.img_end,
                                     bos)
                    answers[item.id] = self._answer(p, ANSWER_TOKENS.get(task, DEFAULT_ANSWER_TOKENS), dtype)
                # Every rank holds the same answers (rank 0's tokens): each scores, for its own sinks.
                results[task][shots] = score(task, answers, items, use_java=True)
        return results


def check_eval_tasks(cfg) -> List[str]:
    """What is wrong with the --eval-tasks settings (checked before the run starts)."""
    t = cfg.training
    if not t.eval_tasks:
        return []
    errors = []
    if cfg.parallel.pipeline_model_parallel_size > 1:
        errors.append("--eval-tasks runs on the training model and does not support pipeline parallelism")
    if not t.eval_tasks_config:
        errors.append("--eval-tasks needs --eval-tasks-config (a JSON file naming each task's annotation files)")
    elif not os.path.isfile(t.eval_tasks_config):
        errors.append(f"--eval-tasks-config {t.eval_tasks_config}: no such file")
    if not t.eval_image_tokenizer:
        errors.append("--eval-tasks needs --eval-image-tokenizer (the image tokenizer of the data's features)")
    return errors


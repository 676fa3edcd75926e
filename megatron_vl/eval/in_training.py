"""Evaluation tasks during pretraining and finetuning (--eval-tasks at --eval-interval),
on the training model itself, whatever its TP / DP / ZeRO layout (not pipelines).

Every rank runs every item in lockstep (ZeRO-3 gathers parameters in each forward, and TP
ranks must run the same forwards); the generated token of each step is rank 0's,
broadcast, so all ranks see the same sequence. Decoding is the inference decode loop
(inference/decode_loop.py) on the engine: greedy, text only, stopped at a newline or end of
sequence, recomputing the whole prefix each step (no KV cache: eval sets here are small, a
few dozen items). Every rank scores; rank 0 prints.

EngineModel is the engine as both harnesses see it (prompts, image embeddings, lockstep
generation, log-probabilities): TrainingEvaluator runs our tasks on it, and
eval/lmms/training.py's EngineBackend hands it to lmms-eval (--eval-harness lmms).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..inference.decode_loop import DecodeStep, Generation, Prompt, decode_loop, left_padded
from ..inference.generation import build_prompt
from ..inference.sampling import Sampling
from .runner import _image
from .settings import FILE_NAMES, TaskFiles
from .tasks import REGISTRY, get_task, support


def read_task_files(path: str, tasks: List[str]) -> Dict[str, TaskFiles]:
    """--eval-tasks-config: {task: {questions, annotations, train_questions, train_annotations,
    image_root, image_pattern}} (tools/evaluate.py's per-task flags, as JSON)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--eval-tasks-config {path}: {exc}") from None
    out = {}
    for task in tasks:
        text_tasks = [name for name, cls in REGISTRY.items() if cls.generates == "text"]
        if task not in text_tasks:
            raise ValueError(f"--eval-tasks {task}: training-time tasks are {', '.join(text_tasks)}")
        if task not in data:
            raise ValueError(f"--eval-tasks-config {path}: no entry for task {task!r}")
        unknown = set(data[task]) - set(FILE_NAMES)
        if unknown:
            raise ValueError(f"--eval-tasks-config {path}: {task}: unknown keys {sorted(unknown)}")
        out[task] = TaskFiles(**{k: v for k, v in data[task].items() if v is not None})
    return out


class EngineStep(DecodeStep):
    """The training engine under the decode loop, one sequence at a time. No KV cache: the
    whole sequence runs again each step (eval sets here are a few dozen items). The tokens
    every rank continues with are rank 0's, broadcast."""

    def __init__(self, engine, vocab_size: int, img: int, img_end: int, num_image_tokens: int, visual_dim: int,
                 device, dtype, max_positions: float = float("inf")):
        super().__init__(img=img, img_end=img_end, num_image_tokens=num_image_tokens, visual_dim=visual_dim,
                         device=device, dtype=dtype, max_positions=max_positions)
        self.engine, self.vocab_size = engine, vocab_size
        self.ids = self.visual = self.visual_mask = None   # the sequence so far
        self.outputs = None                                # (this rank's logits slice, visual predictions)

    def forward(self, ids, visual, visual_mask, attention_mask, position_ids) -> None:
        if self.ids is None:
            if ids.shape[0] != 1:
                raise ValueError(f"the training engine decodes one sequence at a time, got {ids.shape[0]}")
            self.ids, self.visual, self.visual_mask = ids, visual, visual_mask
        else:
            self.ids = torch.cat([self.ids, ids], 1)
            self.visual = torch.cat([self.visual, visual.to(self.dtype)], 1)
            self.visual_mask = torch.cat([self.visual_mask, visual_mask], 1)
        n = self.ids.shape[1]
        self.outputs = self.engine({"tokens": self.ids.masked_fill(self.visual_mask, 0), "visual_embeds": self.visual,
                                    "visual_mask": self.visual_mask,
                                    "position_ids": torch.arange(n, device=self.device)[None], "segment_ids": None})

    def logits(self) -> torch.Tensor:
        return self.engine.module.head.full_logits(self.outputs[0])[:, -1, :self.vocab_size].float()

    def all_logits(self) -> torch.Tensor:
        """[b, S, vocab]: the logits at every element of the latest forward, float32."""
        return self.engine.module.head.full_logits(self.outputs[0])[..., :self.vocab_size].float()

    def regressed(self) -> torch.Tensor:
        return self.outputs[1][:, -1]

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.broadcast(tokens, 0)
        return tokens


class EngineModel:
    """The training engine as an evaluation model: its tokenizer, the image tokenizer the data's
    features came from (prompt images), prompts with BOS as the export's generator builds them,
    and lockstep generation and scoring, one sequence at a time (EngineStep)."""

    def __init__(self, cfg, engine, device, tokenizer_meta: Dict, image_token_ids):
        from ..data.tokenizer import Tokenizer
        from ..model.image_tokenizer import ImageTokenizer, load_image_processor
        t = cfg.training
        self.cfg, self.engine, self.device = cfg, engine, device
        self.tokenizer = Tokenizer(tokenizer_meta["type"], tokenizer_meta["model"])
        self.img, self.img_end = image_token_ids
        if not t.eval_image_tokenizer:
            raise ValueError("--eval-tasks needs --eval-image-tokenizer (the image tokenizer the data's features "
                             "came from)")
        self.image_tokenizer = ImageTokenizer.from_pretrained(t.eval_image_tokenizer).to(device).eval()
        self.processor = load_image_processor(t.eval_image_tokenizer)

    @property
    def bos(self):
        bos = self.tokenizer.bos_id
        return bos if bos is not None and bos >= 0 else None

    def embeddings(self, images) -> List[torch.Tensor]:
        """PIL images -> [N, d] each, float32, by the image tokenizer."""
        if not images:
            return []
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            return list(self.image_tokenizer(pixels).float())

    def prompt(self, text: str, images: Sequence) -> Prompt:
        """Text with one <image> tag per image -> a Prompt (BOS first when the tokenizer has one)."""
        return build_prompt(text, self.tokenizer.encode, self.embeddings(list(images)), self.img, self.img_end,
                            self.bos)

    def decode(self, ids) -> str:
        # Special tokens are no part of an answer's text (an HF tokenizer's decode would spell
        # them out, "<s>" in a VQA answer scores 0); EOS ends it, as in generation.py.
        special = {self.tokenizer.eod_id, self.tokenizer.bos_id, self.img, self.img_end}
        return self.tokenizer.decode([t for t in ids if t not in special])

    def step(self, dtype, max_positions: float = float("inf")) -> EngineStep:
        m = self.cfg.model
        return EngineStep(self.engine, m.vocab_size, self.img, self.img_end, self.cfg.data.num_image_tokens,
                          m.visual_embed_dim, self.device, dtype, max_positions)

    def generate(self, p: Prompt, sampling: Sampling, dtype, max_positions: float = float("inf")) -> Generation:
        """One prompt through the decode loop on the engine (rank 0's tokens on every rank)."""
        return decode_loop(self.step(dtype, max_positions), [p], sampling, self.tokenizer.eod_id, self.decode)[0]

    @torch.no_grad()
    def logits(self, p: Prompt, dtype) -> torch.Tensor:
        """[len(p.tokens), vocab] float32: the next-token logits at every element of `p`, one
        forward on every rank (TP slices gathered)."""
        step = self.step(dtype)
        step.forward(*left_padded([p], step, pad_id=0))   # one prompt: nothing padded
        return step.all_logits()[0]


class TrainingEvaluator(EngineModel):
    """Our tasks (--eval-tasks with --eval-tasks-config) on the engine."""

    def __init__(self, cfg, engine, device, tokenizer_meta: Dict, image_token_ids):
        self.tasks = read_task_files(cfg.training.eval_tasks_config, cfg.training.eval_tasks)
        super().__init__(cfg, engine, device, tokenizer_meta, image_token_ids)
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @staticmethod
    def logged(results: Dict[str, Dict]) -> Tuple[Dict[str, float], List[str]]:
        """run()'s figures as (scalars eval/<task>/<metric>_<k>shot, the console line's parts)."""
        scalars, parts = {}, []
        for task, by_shots in results.items():
            for shots, figures in by_shots.items():
                for metric, value in figures.items():
                    if isinstance(value, (int, float)) and metric != "count":
                        scalars[f"eval/{task}/{metric}_{shots}shot"] = value
                        parts.append(f"{task} {shots}-shot {metric}: {value:.2f}")
        return scalars, parts

    def _answer(self, p: Prompt, max_new: int, dtype) -> str:
        return self.generate(p, Sampling(max_new_tokens=max_new, stop=("\n",), text_only=True), dtype).text.strip()

    @torch.no_grad()
    def run(self) -> Dict[str, Dict]:
        t = self.cfg.training
        results = {}
        for name, files in self.tasks.items():
            task = get_task(name)
            items = task.items(files)[:t.eval_max_items]
            pool = task.items(files, "train") if max(t.eval_shots) > 0 else []
            results[name] = {}
            for shots in t.eval_shots:
                answers = {}
                for item in items:
                    examples = support(item, pool, shots, t.seed)
                    text = task.prompt(item, examples)
                    images = [_image(e.image) for e in examples] + [_image(item.image)]
                    answers[item.id] = self._answer(self.prompt(text, images), task.answer_tokens, t.torch_dtype)
                # Every rank holds the same answers (rank 0's tokens): each scores, for its own sinks.
                results[name][shots] = task.score(answers, items, use_java=True)
        return results


def check_eval_tasks(cfg) -> List[str]:
    """What is wrong with the --eval-tasks settings (checked before the run starts): what both
    harnesses need here, each harness's own (lmms: eval/lmms/checks.py)."""
    t = cfg.training
    if t.eval_harness not in ("builtin", "lmms"):   # (a YAML value: the flag's choices are argparse's)
        return [f"--eval-harness {t.eval_harness!r}: expected builtin or lmms"]
    lmms = t.eval_harness == "lmms"
    errors = []
    if t.eval_lmms_include_path and not lmms:
        errors.append(f"--eval-lmms-include-path {t.eval_lmms_include_path}: only --eval-harness lmms reads it")
    if not t.eval_tasks:
        return errors
    if cfg.parallel.pipeline_model_parallel_size > 1:
        errors.append(f"{'--eval-harness lmms' if lmms else '--eval-tasks'} runs on the training model and does not "
                      "support pipeline parallelism")
    if not t.eval_image_tokenizer:
        errors.append("--eval-tasks needs --eval-image-tokenizer (the image tokenizer of the data's features)")
    if lmms:
        from .lmms.checks import check_lmms_tasks
        return errors + check_lmms_tasks(cfg)
    if not t.eval_tasks_config:
        errors.append("--eval-tasks needs --eval-tasks-config (a JSON file naming each task's annotation files)")
    elif not os.path.isfile(t.eval_tasks_config):
        errors.append(f"--eval-tasks-config {t.eval_tasks_config}: no such file")
    return errors

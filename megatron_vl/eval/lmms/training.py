"""lmms-eval tasks on the live training model (``--eval-harness lmms --eval-tasks ...`` at
``--eval-interval``), with no second copy of the weights.

- EngineBackend: the Backend contract (backend.py) over eval/in_training.EngineModel, the
  engine as our own in-training harness drives it: one sequence at a time, every rank running
  every forward in lockstep (ZeRO-3 gathers parameters in each forward; TP ranks must run the
  same ones), the generated tokens and the scores rank 0's, broadcast.
- LmmsEvaluator / run_lmms_tasks: lmms-eval's simple_evaluate on a VLGPTLmms over that backend.
  Every rank calls it with RANK/WORLD_SIZE/LOCAL_RANK set to 0/1/0, so lmms-eval neither
  shards the documents nor gathers results (its data parallelism would split ranks that must
  run the same forwards); its one collective, a barrier on the default group, every rank
  reaches. lmms-eval's own seeds (0 / 1234 / 1234, as its CLI: a task's random fallback, e.g.
  MMMU's pick when no option parses, draws the same as in a CLI run); they reseed the global
  generators, so the trainer keeps its random streams around the whole evaluation
  (training/pretrain.random_state_kept). No bootstrap.
  The pre-run checks and the task resolution are checks.py's.

Global side effects that remain (lmms-eval's, for the rest of the process): ``lmms_eval.models``
replaces loguru's handlers with one of its own on stdout at WARNING (loguru is lmms-eval's
logger, not ours); simple_evaluate patches filelock's metaclass (reentrant locks) and makes
ssl.SSLContext picklable. Put back: the warning filters (checks.import_lmms), the environment
(one_process_view); the training's random streams are kept by the trainer around the whole
evaluation (training/pretrain.random_state_kept).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...errors import UsageError
from ...inference.decode_loop import Generation, Prompt, check_positions
from ...inference.sampling import GenerationError, Sampling, check_text
from ..in_training import EngineModel
from .backend import Backend, check_continuations, score_rows
from .checks import import_lmms, resolve_tasks


class EngineBackend(Backend):
    """The training engine (an in_training.EngineModel) as model.py's Backend. Generation and
    scoring run one prompt at a time on every rank; the engine must be in eval mode."""

    can_generate_images = False

    def __init__(self, model: EngineModel, dtype: torch.dtype, max_positions: int):
        self.model = model
        self.device = torch.device(model.device)
        self.dtype = dtype                      # the training precision (the visual inputs' dtype)
        self.max_positions = max_positions      # --max-position-embeddings (or --seq-length)

    def prompt(self, text: str, images: Sequence) -> Prompt:
        check_text(text)
        p = self.model.prompt(text, images)
        check_positions(p, self.max_positions)
        return p

    def encode(self, text: str) -> List[int]:
        check_text(text)
        return self.model.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(ids)

    def generate(self, prompts: List[Prompt], sampling: Sampling) -> List[Generation]:
        out = [self.model.generate(p, sampling, self.dtype, self.max_positions) for p in prompts]
        for g in out:   # (on the CPU, as inference.generation.generate returns them)
            g.images = [image.cpu() for image in g.images]
        return out

    @torch.no_grad()
    def score(self, prompts: List[Prompt], n_continuation: List[int]) -> List[Tuple[float, bool]]:
        check_continuations(prompts, n_continuation)
        out = []
        for p, n in zip(prompts, n_continuation):
            logits = self.model.logits(p, self.dtype)   # every rank runs this forward
            ll, greedy = score_rows(torch.log_softmax(logits[-n - 1:-1], -1),
                                    torch.tensor(p.tokens[-n:], device=logits.device))
            out.append(_rank0s(ll, greedy, self.device))
        return out

    def image_decoder(self):
        raise GenerationError("--eval-harness lmms: the training model has no image detokenizer; tasks that "
                              "score generated images run on an export (python -m lmms_eval --model vlgpt)")


def _rank0s(ll: float, greedy: bool, device) -> Tuple[float, bool]:
    """Rank 0's score on every rank (as generation takes rank 0's tokens): ranks that reduce in
    another order must still log, and lmms-eval aggregate, the same figures."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ll, greedy
    t = torch.tensor([ll, float(greedy)], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t[0]), bool(t[1])


# --- the driver -------------------------------------------------------------------------

@contextlib.contextmanager
def one_process_view(rank: int):
    """lmms-eval sees one process (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0) on every rank. Its
    progress bars (stderr: its own, datasets') are not shown; ranks other than 0, whose output
    would repeat rank 0's, show nothing (stdout, and lmms-eval's loguru warnings). The
    environment is put back as it was (an import inside sets KMP_DUPLICATE_LIB_OK)."""
    from loguru import logger
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    quiet = rank != 0
    if quiet:
        logger.disable("lmms_eval")
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
                (contextlib.redirect_stdout(null) if quiet else contextlib.nullcontext()):
            yield
    finally:
        if quiet:
            logger.enable("lmms_eval")
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def run_lmms_tasks(lm, task_manager, tasks: Sequence[str], limit: Optional[int], rank: int = 0,
                   log_samples: bool = False) -> Dict:
    """lmms-eval's simple_evaluate on the lmms instance `lm`, in lockstep on every rank (see the
    module docstring); returns its results dict (every rank gets it)."""
    evaluator, _, _ = import_lmms()
    lm.accelerator = None   # else evaluate() may build an Accelerator()
    with one_process_view(rank):
        return evaluator.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, log_samples=log_samples,
            bootstrap_iters=0, distributed_executor_backend="torchrun", verbosity="WARNING", process_docs_parallel=1)


def figures(results: Dict) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results: lmms-eval's "metric,filter" keys
    as "metric" under its default filter "none", else "metric_filter"; stderr entries (none
    without bootstrap) and anything not a number left out."""
    out: Dict[str, Dict[str, float]] = {}
    for task, row in results["results"].items():
        values = {}
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, kind = key.split(",", 1)
            if "_stderr" in metric:
                continue
            values[metric if kind == "none" else f"{metric}_{kind}"] = float(value)
        out[task] = values
    return out


def logged_figures(by_task: Dict[str, Dict[str, float]]) -> Tuple[Dict[str, float], List[str]]:
    """(scalars eval/<task>/<metric>, the console line's parts "<task> <metric>: v")."""
    scalars, parts = {}, []
    for task, values in by_task.items():
        for metric, value in values.items():
            scalars[f"eval/{task}/{metric}"] = value
            parts.append(f"{task} {metric}: {value:.4f}")
    return scalars, parts


class LmmsEvaluator:
    """--eval-harness lmms on the training engine: the model and the TaskManager built once
    (at the first evaluation), simple_evaluate at every one. run() -> {task: {metric: value}},
    the same on every rank."""

    log_samples = False
    """Keep lmms-eval's per-document samples in `last` (tests read the answers)."""

    def __init__(self, cfg, engine, device, tokenizer_meta: Dict, image_token_ids):
        import torch.distributed as dist
        _, _, VLGPTLmms = import_lmms()
        t = cfg.training
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.task_manager, unknown = resolve_tasks(t.eval_lmms_include_path, t.eval_tasks)
        if unknown:   # (checked before the run; a task directory changed since)
            raise UsageError(f"--eval-tasks {' '.join(unknown)}: no such lmms-eval task")
        self.backend = EngineBackend(EngineModel(cfg, engine, device, tokenizer_meta, image_token_ids),
                                     t.torch_dtype, cfg.model.max_positions)
        self.lm = VLGPTLmms(backend=self.backend, batch_size=1)
        self.last: Optional[Dict] = None   # simple_evaluate's latest results

    logged = staticmethod(logged_figures)
    """run()'s figures as (scalars, the console line's parts): see logged_figures."""

    @torch.no_grad()
    def run(self) -> Dict[str, Dict[str, float]]:
        t = self.cfg.training
        self.last = run_lmms_tasks(self.lm, self.task_manager, t.eval_tasks, t.eval_max_items, self.rank,
                                   self.log_samples)
        return figures(self.last)

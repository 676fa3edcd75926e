"""lmms-eval found, imported and its task names resolved: the pre-run checks of --eval-harness
lmms (eval/in_training.check_eval_tasks calls check_lmms_tasks), and the imports and
TaskManager the in-training driver (training.py) reuses. Nothing here imports torch or the
training model: the checks run before any of it is built.

lmms_eval is imported only when --eval-harness lmms is asked for (about 10 s); its utils module
runs warnings.filterwarnings("ignore") at import, undone here (the import runs inside
warnings.catch_warnings).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

NOT_INSTALLED = "--eval-harness lmms needs lmms-eval: pip install -e .[lmms]"


def lmms_installed() -> bool:
    try:
        return importlib.util.find_spec("lmms_eval") is not None
    except (ImportError, ValueError):   # ValueError: sys.modules holds None for it
        return False


def import_lmms():
    """(lmms_eval.evaluator, lmms_eval.tasks.TaskManager, model.VLGPTLmms). lmms-eval's utils
    runs warnings.filterwarnings("ignore") at import: the filters are put back after it."""
    with warnings.catch_warnings():
        from lmms_eval import evaluator
        from lmms_eval.tasks import TaskManager
        from .model import VLGPTLmms
    return evaluator, TaskManager, VLGPTLmms


_MANAGERS: Dict[Tuple[Optional[str], bool], object] = {}


def _task_manager(include_path: Optional[str], include_defaults: bool):
    """One TaskManager per (include path, built-ins or not) in a process: indexing lmms-eval's
    ~2,000 built-in tasks takes seconds, the include path alone a few milliseconds."""
    key = (include_path, include_defaults)
    if key not in _MANAGERS:
        _, TaskManager, _ = import_lmms()
        _MANAGERS[key] = TaskManager("WARNING", include_path=include_path, include_defaults=include_defaults)
    return _MANAGERS[key]


def resolve_tasks(include_path: Optional[str], names: Sequence[str]):
    """(the TaskManager that knows `names`, the names it does not know): the include path's
    tasks first; lmms-eval's built-in ones are indexed only when a name is not among those."""
    if include_path:
        manager = _task_manager(include_path, False)
        unknown = [n for n in names if n not in manager.all_tasks]
        if not unknown:
            return manager, []
    manager = _task_manager(include_path, True)
    return manager, [n for n in names if n not in manager.all_tasks]


RUNNABLE_OUTPUT_TYPES = ("generate_until", "loglikelihood", "multiple_choice")


def _task_configs(manager, name: str, seen=None):
    """(task name, its YAML config) for `name` and, for a group or tag, every task under it.
    A name the manager does not index yields (name, None); a Python-class task yields {}."""
    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    if name not in manager.task_index:
        yield name, None
        return
    kind = manager.task_index[name]["type"]
    if kind in ("task", "python_task"):
        yield name, manager._get_config(name)
        return
    members = manager._get_tasklist(name)
    if members == -1:   # a group with a YAML of its own: its "task" list
        members = manager._get_config(name).get("task", [])
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, str):
            yield from _task_configs(manager, member, seen)
        elif isinstance(member, dict) and isinstance(member.get("task"), str):
            base = manager._get_config(member["task"]) if member["task"] in manager.task_index else {}
            yield member["task"], {**base, **member}


def task_problems(manager, names: Sequence[str]) -> List[str]:
    """What the vlgpt model cannot run among `names` (groups and tags expanded), one line each:
    a task lmms-eval does not index, an output type other than generate_until / loglikelihood /
    multiple_choice, generation_kwargs the model refuses (beam search, out-of-range values), a
    loglikelihood task left to lmms-eval's default scoring (which fails whatever the model).
    Found here, before training starts, not at the first --eval-interval hours in."""
    from ...errors import UsageError
    from .model import sampling_from_gen_kwargs
    problems = []
    for name in names:
        for task, config in _task_configs(manager, name):
            where = f"--eval-tasks {name}" + (f" (its task {task})" if task != name else "")
            if config is None:
                problems.append(f"{where}: no such lmms-eval task")
                continue
            kind = config.get("output_type", "generate_until")
            if kind not in RUNNABLE_OUTPUT_TYPES:
                problems.append(f"{where}: output_type {kind}; the vlgpt model runs {', '.join(RUNNABLE_OUTPUT_TYPES)} "
                                "tasks")
            elif kind == "loglikelihood" and not config.get("process_results"):
                problems.append(f"{where}: a loglikelihood task needs its own process_results (lmms-eval 0.7.3's "
                                "default unpacks the one-element results list as a pair and fails for any model: "
                                "`ll, greedy = results[0]`, see megatron_vl/testing/lmms_tasks.py)")
            elif kind == "generate_until":
                try:
                    sampling_from_gen_kwargs(config.get("generation_kwargs") or {}, where, text_only=True)
                except UsageError as exc:   # GenerationError included
                    problems.append(str(exc))
    return problems


def check_lmms_tasks(cfg) -> List[str]:
    """What is wrong with --eval-harness lmms's own settings (before the run starts; one line
    each). What both harnesses need (tasks named, no pipeline, an image tokenizer) is
    eval/in_training.check_eval_tasks's, which calls this."""
    t = cfg.training
    if not t.eval_tasks:
        return []
    errors = []
    if t.eval_tasks_config:
        errors.append(f"--eval-tasks-config {t.eval_tasks_config}: only --eval-harness builtin reads it (lmms-eval "
                      "tasks name their own data; see --eval-lmms-include-path)")
    if list(t.eval_shots) != [0]:
        errors.append(f"--eval-shots {' '.join(map(str, t.eval_shots))}: only --eval-harness builtin reads it "
                      "(an lmms-eval task sets its own num_fewshot)")
    path = t.eval_lmms_include_path
    if path and not os.path.isdir(path):
        errors.append(f"--eval-lmms-include-path {path}: no such directory")
        path = None
    if not lmms_installed():
        return errors + [NOT_INSTALLED]
    if path or not t.eval_lmms_include_path:
        manager, unknown = resolve_tasks(path, t.eval_tasks)
        if unknown:
            where = f"{path} or lmms-eval's built-in tasks" if path else "lmms-eval's built-in tasks"
            errors.append(f"--eval-tasks {' '.join(unknown)}: no such lmms-eval task (looked in {where})")
        errors += task_problems(manager, [n for n in t.eval_tasks if n not in unknown])
    return errors

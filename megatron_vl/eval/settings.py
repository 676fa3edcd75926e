"""The settings an evaluation task runs with, as dataclasses: ``TaskFiles`` (the local files
one task reads), ``TaskOption`` (a setting one task declares beyond the shared ones, such as
t2i's FID weights) and ``EvalSettings`` (one task's run). Library code takes these and
refuses an argparse Namespace: tools/evaluate.py builds them from its flags, and only it
speaks in flag names."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, Iterable, Optional, Tuple

from ..errors import UsageError

DEFAULT_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"


@dataclass(frozen=True)
class TaskFiles:
    """The local files of one task (the evaluated split and the k-shot support split)."""

    questions: Optional[str] = None
    """Questions json of the evaluated split (the VQA or GQA layout)."""
    annotations: Optional[str] = None
    """Annotations json of the evaluated split (VQA annotations, the VizWiz list, Karpathy's dataset_coco.json)."""
    train_questions: Optional[str] = None
    """Questions json of the k-shot support split."""
    train_annotations: Optional[str] = None
    """Annotations json of the k-shot support split."""
    image_root: Optional[str] = None
    """Directory the items' image paths are relative to (scoring a results file reads no image)."""
    image_pattern: str = DEFAULT_IMAGE_PATTERN
    """A VQA image's file name from its question's image_id (str.format, field image_id)."""


FILE_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TaskFiles))
# The fields that name a file or directory the run reads (the pattern is a template).
PATH_NAMES: Tuple[str, ...] = tuple(n for n in FILE_NAMES if n != "image_pattern")
# What each TaskFiles field is, as errors name it.
FILE_ROLES = {"questions": "questions file", "annotations": "annotations file",
              "train_questions": "train questions file", "train_annotations": "train annotations file",
              "image_root": "image root", "image_pattern": "image file pattern"}


@dataclass(frozen=True)
class TaskOption:
    """A setting one task declares beyond the shared ones; tools/evaluate.py offers it as
    ``--<name with dashes>``."""

    name: str
    """Its key in EvalSettings.options (a Python identifier)."""
    help: str
    """What it is, for --help."""
    type: Callable = str
    """The type of its value: str, int or float."""
    default: object = None
    """Its value when unset."""
    minimum: Optional[int] = None
    """The least value an int option accepts (None: any)."""
    is_path: bool = False
    """A file or directory the run reads (an --output must not name it)."""
    cli: bool = True
    """False: set from Python only (an injected module, in tests), never a flag."""


@dataclass
class EvalSettings:
    """How one task runs on a model, or how its results file is scored."""

    files: TaskFiles = field(default_factory=TaskFiles)
    """The task's files."""
    max_items: int = 0
    """Evaluate (or score against) the first N items of the evaluated split; 0: all."""
    batch_size: int = 8
    """Prompts generated together."""
    seed: int = 0
    """Seed of the k-shot support draw (and of t2i's diffusion)."""
    use_java: bool = True
    """CIDEr: tokenize with Java's PTB tokenizer when Java is there (else the Python approximation)."""
    options: Dict[str, object] = field(default_factory=dict)
    """Values of the task's own TaskOptions by name; an unset one takes its default."""

    def __post_init__(self):
        refuse_namespace(self.files, "TaskFiles")
        if not isinstance(self.files, TaskFiles):
            raise TypeError(f"EvalSettings.files must be TaskFiles, got {type(self.files).__name__}")
        if isinstance(self.max_items, bool) or not isinstance(self.max_items, int) or self.max_items < 0:
            raise UsageError(f"max_items {self.max_items!r}: must be an integer, 0 (all) or more")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"batch_size {self.batch_size!r}: must be an integer, 1 or more")


SETTING_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EvalSettings) if f.name not in ("files",
                                                                                                        "options"))


def refuse_namespace(value, wanted: str) -> None:
    """Command-line flags stop at the tool: an argparse Namespace here would tie the library to
    flag spellings (no_java, --<task>-x dests) that only tools/evaluate.py knows."""
    if isinstance(value, argparse.Namespace):
        raise TypeError(f"got an argparse Namespace where {wanted} is expected: library code takes {wanted} "
                        "(tools/evaluate.py builds it from its flags)")


def _record(value, wanted: str) -> dict:
    refuse_namespace(value, wanted)
    if isinstance(value, SimpleNamespace):
        return dict(vars(value))
    if isinstance(value, dict):
        return dict(value)
    raise TypeError(f"expected {wanted}, got {type(value).__name__}")


def as_task_files(value) -> TaskFiles:
    """`value` as TaskFiles: TaskFiles itself, or a plain record (a dict or SimpleNamespace, as
    the in-training evaluator's per-task JSON entries) of its field names, None meaning unset."""
    if isinstance(value, TaskFiles):
        return value
    record = _record(value, "TaskFiles")
    unknown = sorted(set(record) - set(FILE_NAMES))
    if unknown:
        raise TypeError(f"not TaskFiles fields: {unknown} (they are {', '.join(FILE_NAMES)})")
    return TaskFiles(**{k: v for k, v in record.items() if v is not None})


def as_eval_settings(value, option_names: Iterable[str]) -> EvalSettings:
    """`value` as EvalSettings: EvalSettings itself, or one flat record (SimpleNamespace or dict)
    of TaskFiles fields, EvalSettings fields and the task's option names — the form callers
    used before these dataclasses. Anything else, an argparse Namespace included, is refused."""
    if isinstance(value, EvalSettings):
        return value
    record = _record(value, "EvalSettings")
    option_names = set(option_names)
    unknown = sorted(set(record) - set(FILE_NAMES) - set(SETTING_NAMES) - option_names)
    if unknown:
        raise TypeError(f"not settings of this task: {unknown} (files: {', '.join(FILE_NAMES)}; settings: "
                        f"{', '.join(SETTING_NAMES)}; options: {', '.join(sorted(option_names)) or 'none'})")
    files = as_task_files({k: v for k, v in record.items() if k in FILE_NAMES})
    shared = {k: v for k, v in record.items() if k in SETTING_NAMES and v is not None}
    options = {k: v for k, v in record.items() if k in option_names and v is not None}
    return EvalSettings(files=files, options=options, **shared)

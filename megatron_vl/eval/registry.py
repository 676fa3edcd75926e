"""What an evaluation task is (``EvalTask``: its files, its items, its prompt, its metric, its
own settings) and the registry of them by name. tools/evaluate.py's task choices and
per-task flags, the runner and the in-training evaluator all read the registry: a benchmark
is one ``@register``-ed class (the built-in ones are in tasks.py)."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple, Type

from ..errors import UsageError
from . import metrics
from .records import EvalFileError, FilesMismatch, Item, few, get, list_of, load_json
from .settings import FILE_NAMES, FILE_ROLES, EvalSettings, TaskFiles, TaskOption, as_task_files

GENERATES = ("text", "images")


class EvalTask:
    """One benchmark. A subclass sets the class attributes below and ``read_items``; the
    defaults are a VQA-style task: ``<image>Question: {q} Short answer:`` prompts, answers
    scored by VQA accuracy, results files of ``{"question_id", "answer"}``."""

    name: ClassVar[str] = ""
    """The task's name: --tasks / --task choice and the prefix of its per-task flags."""
    reads: ClassVar[Tuple[str, ...]] = ()
    """The TaskFiles fields it reads (each becomes a per-task flag)."""
    requires: ClassVar[Tuple[str, ...]] = ()
    """Those of `reads` the evaluated split cannot do without."""
    support: ClassVar[str] = ""
    """Where its k-shot support examples come from, for the error when they are missing."""
    options: ClassVar[Tuple[TaskOption, ...]] = ()
    """Settings of its own beyond EvalSettings' shared ones."""
    generates: ClassVar[str] = "text"
    """"text": answers scored against the truth; "images": an image per item (text-to-image)."""
    answer_tokens: ClassVar[int] = 10
    """The most tokens an answer may take."""
    results_layout: ClassVar[Optional[Tuple[str, str]]] = ("question_id", "answer")
    """(id key, answer key) of a record of its official results file; None: it has no results file."""

    # --- its items ---------------------------------------------------------------------

    def read_items(self, files: TaskFiles, split: str) -> List[Item]:
        """The items of `split` ('test': evaluated; 'train': the k-shot support, [] when its
        files are not given)."""
        raise NotImplementedError

    def missing(self, files: TaskFiles) -> List[str]:
        """The required TaskFiles fields `files` leaves unset."""
        return [name for name in self.requires if not getattr(files, name)]

    def items(self, files: TaskFiles, split: str = "test") -> List[Item]:
        """The evaluated items (split 'test') or the k-shot support items (split 'train')."""
        files = as_task_files(files)
        missing = [] if split == "train" else self.missing(files)
        if missing:
            raise UsageError(f"{self.name} needs its {' and '.join(FILE_ROLES[m] for m in missing)} (settings "
                             f"{', '.join(missing)})")
        return self.read_items(files, split)

    # --- its prompt ----------------------------------------------------------------------

    def prompt(self, item: Item, examples: List[Item]) -> str:
        """The text of the prompt (one <image> per image, in order: the examples', then the item's)."""
        return "".join(f"<image>Question: {e.question} Short answer: {e.answer}\n" for e in examples) + \
            f"<image>Question: {item.question} Short answer:"

    # --- its metric ----------------------------------------------------------------------

    def figures(self, results: Dict, truth: Dict[object, List[str]], use_java: bool) -> Dict:
        """{metric: value, ..., "count"} of `results` ({id: text}) against `truth` ({id: [texts]}),
        which answer the same ids."""
        return {"accuracy": metrics.vqa_accuracy(results, truth), "count": len(results)}

    def official_line(self, figures: Dict) -> str:
        """What the official evaluation prints for the figure."""
        return f"Overall Accuracy is: {figures['accuracy']:.02f}"

    def score(self, results: Dict, items: List[Item], use_java: bool = True) -> Dict:
        """{metric: value, ...} of `results` ({id: text}) over `items`; results must answer exactly
        the items (as the official VQA loadRes asserts): a subset would score as if it were all."""
        truth = {i.id: i.truth for i in items}
        if not truth:
            raise EvalFileError(f"{self.name}: the annotation files hold no questions to score")
        if not results:
            raise EvalFileError(f"{self.name}: no results to score")
        unknown = [k for k in results if k not in truth]
        if unknown:
            raise FilesMismatch(f"results name {len(unknown)} id(s) the annotations lack, e.g. {few(unknown)}")
        missing = [k for k in truth if k not in results]
        if missing:
            raise FilesMismatch(f"results answer {len(results)} of the {len(truth)} annotated questions; "
                                f"{len(missing)} missing, e.g. {few(missing)} (a subset would be scored as the "
                                "whole: answer them all, or score a run on the first N items with max_items N)")
        return self.figures(results, truth, use_java)

    def read_results(self, path: str) -> Dict:
        """{id: answer/caption} from a results file in the task's official format."""
        if self.results_layout is None:
            raise UsageError(f"{self.name} has no results file to score: its figures come from the model's output")
        key, value = self.results_layout
        rows = list_of(load_json(path, "results file"), None, path, "results file",
                       f"a json list of {{{key!r}, {value!r}}} objects")
        if not rows:
            raise EvalFileError(f"results file {path}: no results to score (an empty list)")
        out: Dict = {}
        for n, r in enumerate(rows):
            where = f"results file {path}: [{n}]"
            rid = get(r, key, (int, str), where)
            answer = get(r, value, str, where)
            if rid in out:
                # The official API keeps the last silently; which answer counts would be a guess.
                raise EvalFileError(f"{where}: {key} {rid!r} has a result already (results must name each id once)")
            out[rid] = answer
        return out

    # --- its own settings ---------------------------------------------------------------

    def option_values(self, settings: EvalSettings) -> Dict[str, object]:
        """Every option of the task: the value in `settings`, else its default."""
        declared = {o.name: o for o in self.options}
        unknown = sorted(set(settings.options) - set(declared))
        if unknown:
            raise TypeError(f"{self.name} has no options {unknown} (it has: {', '.join(declared) or 'none'})")
        return {name: settings.options.get(name, o.default) for name, o in declared.items()}


REGISTRY: Dict[str, Type[EvalTask]] = {}
"""Task name -> its class, in registration order (the order of the tool's choices)."""


def register(cls: Type[EvalTask]) -> Type[EvalTask]:
    """Adds a task class to the registry (a class decorator), refusing one whose declaration
    could not work: the tool derives flags from it before any file is read."""
    name = cls.name
    if not name or not isinstance(name, str) or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"{cls.__name__}: task name {name!r} must be letters, digits and '_'")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"{cls.__name__}: task {name!r} is registered already ({REGISTRY[name].__name__})")
    unknown = [f for f in cls.reads if f not in FILE_NAMES]
    if unknown:
        raise ValueError(f"{cls.__name__}: reads {unknown}, not TaskFiles fields ({', '.join(FILE_NAMES)})")
    if not set(cls.requires) <= set(cls.reads):
        raise ValueError(f"{cls.__name__}: requires {sorted(set(cls.requires) - set(cls.reads))} it does not read")
    if cls.generates not in GENERATES:
        raise ValueError(f"{cls.__name__}: generates {cls.generates!r}, expected one of {GENERATES}")
    REGISTRY[name] = cls
    return cls

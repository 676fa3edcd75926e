r"""Zero- and few-shot evaluation of a VL-GPT export (VL-GPT's benchmarks), or scoring a results
file in the official format without a model. Annotation files, images and weights are local.

    # a model on several tasks, 0/2/4/8 shots (data-parallel with torchrun: each rank answers its share)
    python tools/evaluate.py --hf-dir vlgpt-hf --tasks coco_caption vqav2 t2i --shots 0 2 4 8 \
        --coco_caption-annotations coco/dataset_coco.json --coco_caption-image-root coco \
        --vqav2-questions v2_OpenEnded_mscoco_val2014_questions.json \
        --vqav2-annotations v2_mscoco_val2014_annotations.json --vqav2-image-root coco/val2014 \
        --vqav2-train-questions v2_OpenEnded_mscoco_train2014_questions.json \
        --vqav2-train-annotations v2_mscoco_train2014_annotations.json \
        --t2i-annotations coco/dataset_coco.json --t2i-image-root coco \
        --fid-weights pt_inception-2015-12-05-6726825d.pth --clip-score-model clip-vit-large-patch14 \
        --max-items 5000 --output results.json
    torchrun --nproc_per_node 8 tools/evaluate.py ...
    # a results file, as the official scripts score it
    python tools/evaluate.py --task vqav2 --questions Q.json --annotations A.json --results R.json
    python tools/evaluate.py --task coco_caption --annotations dataset_coco.json --results captions.json

Per-task flags are --<task>-<name>, for the files that task reads (listed below); the plain
--<name> applies to every task that does not set its own. The tasks, their prompts and file
layouts: megatron_vl/eval/tasks.py (a task is one registered class there; its name, files and
options become this tool's choices and flags). CIDEr tokenizes with Java's PTB tokenizer (Java
17 is enough); without Java a Python approximation runs and the output says so.
"""

import argparse
import json
import os
import sys

from megatron_vl.errors import UsageError, UserError, run_cli
from megatron_vl.eval.settings import FILE_NAMES, PATH_NAMES, EvalSettings, TaskFiles
from megatron_vl.eval.tasks import REGISTRY, get_task


def at_least(lo):
    """An argparse int type refusing values below `lo` (exit 2, naming the flag). Here rather than
    generation's: scoring a results file imports no torch."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        return value
    return parse


positive_int, non_negative_int = at_least(1), at_least(0)


def flag(name):
    """The flag of a setting: image_root -> --image-root."""
    return "--" + name.replace("_", "-")


def file_names():
    """The TaskFiles fields some registered task reads (each a plain --<name> flag), in TaskFiles order."""
    read = {name for cls in REGISTRY.values() for name in cls.reads}
    return [name for name in FILE_NAMES if name in read]


def task_options():
    """{name: TaskOption} of every registered task's command-line options (two tasks may share one)."""
    out = {}
    for cls in REGISTRY.values():
        for option in cls.options:
            if option.cli and out.setdefault(option.name, option) != option:
                raise ValueError(f"task option {option.name!r} is declared twice, differently")
    return out


def tasks_epilog():
    lines = ["tasks (the files each reads; required ones starred):"]
    for name, cls in REGISTRY.items():
        files = " ".join(flag(f) + ("*" if f in cls.requires else "") for f in cls.reads)
        options = " ".join(flag(o.name) for o in cls.options if o.cli)
        lines.append(f"  {name:<14}{files}" + (f"; options {options}" if options else ""))
    return "\n".join(lines)


def build_parser():
    names = list(REGISTRY)
    p = argparse.ArgumentParser(description=__doc__, epilog=tasks_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="a VL-GPT export (export-hf, with --image-tokenizer; t2i: --image-detokenizer)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tasks", nargs="+", choices=names, help="tasks to run with the model")
    mode.add_argument("--task", choices=names, help="with --results: the task whose results file to score")
    p.add_argument("--results", help="a results file in the task's official format (no model)")
    p.add_argument("--shots", nargs="+", type=non_negative_int, default=[0])
    for name in file_names():
        p.add_argument(flag(name), dest=name, default=getattr(TaskFiles(), name))
    for task, cls in REGISTRY.items():
        for name in cls.reads:
            p.add_argument(f"--{task}-{flag(name)[2:]}", dest=f"{task}.{name}", help=argparse.SUPPRESS)
    p.add_argument("--max-items", type=non_negative_int, default=0,
                   help="evaluate the first N items of each task (0: all); with --results: score against the first N")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0, help="k-shot support examples are drawn with this seed")
    for name, option in task_options().items():
        kind = at_least(option.minimum) if option.type is int and option.minimum is not None else option.type
        p.add_argument(flag(name), dest=name, type=kind, default=option.default, help=option.help)
    p.add_argument("--no-java", action="store_true", help="CIDEr: the Python tokenizer even when Java is there")
    p.add_argument("--output", help="write every figure and answer here (JSON; scoring a --results file: its "
                   "figures). Never an input of the run; an existing file only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def task_settings(args, task) -> EvalSettings:
    """The settings a task runs with: its own --<task>-x flags over the plain --x ones, its options."""
    cls = REGISTRY[task]
    files = {}
    for name in cls.reads:
        own = getattr(args, f"{task}.{name}")
        files[name] = own if own is not None else getattr(args, name)
    options = {o.name: getattr(args, o.name) for o in cls.options if o.cli and getattr(args, o.name) is not None}
    return EvalSettings(files=TaskFiles(**{k: v for k, v in files.items() if v is not None}),
                        max_items=args.max_items, batch_size=args.batch_size, seed=args.seed,
                        use_java=not args.no_java, options=options)


def input_paths(args):
    """Every file or directory the run reads (the --output guard keeps clear of them all)."""
    paths = [args.results, args.hf_dir]
    paths += [getattr(args, name) for name, option in task_options().items() if option.is_path]
    for name in file_names():
        if name in PATH_NAMES:
            paths.append(getattr(args, name))
    for task, cls in REGISTRY.items():
        paths += [getattr(args, f"{task}.{name}") for name in cls.reads if name in PATH_NAMES]
    return [p for p in paths if p]


def check_args(args):
    """Flag combinations refused before anything is read (exit 2)."""
    if args.results:
        if not args.task:
            raise UsageError("--results needs --task (the task whose results file it is)")
        if args.hf_dir:
            raise UsageError("--results scores a results file without a model: drop --hf-dir (or drop --results and "
                             "--task to run the model with --tasks)")
        if REGISTRY[args.task].results_layout is None:
            raise UsageError(f"--task {args.task} has no results file to score: run the model on it with --hf-dir "
                             f"and --tasks {args.task}")
        tasks = [args.task]
    elif args.task:
        raise UsageError("--task names the task of a --results file; to run a model use --hf-dir and --tasks")
    elif not (args.hf_dir and args.tasks):
        raise UsageError("name --hf-dir and --tasks (or --task and --results to score a results file)")
    else:
        tasks = args.tasks
    for task in tasks:
        missing = get_task(task).missing(task_settings(args, task).files)
        if missing:
            raise UsageError(f"--task{'s' if args.tasks else ''} {task} needs {' and '.join(map(flag, missing))} (or "
                             f"{' and '.join(f'--{task}-{flag(m)[2:]}' for m in missing)})")
    if args.output:
        from megatron_vl.atomic import guard_output
        guard_output(args.output, inputs=input_paths(args), overwrite=args.overwrite)


def write_output(path, data):
    from megatron_vl.atomic import atomic_open
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, default=str)
    print(f"wrote {path}")


def score_results(args) -> int:
    from megatron_vl.eval.records import EvalFileError, FilesMismatch
    task = get_task(args.task)
    settings = task_settings(args, args.task)
    items = task.items(settings.files)
    if args.max_items:   # the items a --max-items run answered: the first N
        items = items[:args.max_items]
    if not items:
        files = " and ".join(f"{flag(n)} {getattr(settings.files, n)}" for n in task.requires)
        raise EvalFileError(f"{files}: no questions to score (split 'test' for Karpathy files)")
    results = task.read_results(args.results)
    try:
        figures = task.score(results, items, use_java=settings.use_java)
    except FilesMismatch as exc:
        raise FilesMismatch(f"{exc} (--results {args.results})") from None
    print(task.official_line(figures))
    if "tokenizer" in figures:
        print(f"(captions tokenized by the {figures['tokenizer']})")
    if args.output:
        write_output(args.output, {"task": args.task, "results": os.path.abspath(args.results), "figures": figures})
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        if args.results:
            return score_results(args)
        return run_model(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        if isinstance(exc, UserError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_model(args) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from megatron_vl.eval.runner import evaluate, table
    from megatron_vl.inference.generation import Generator
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    gen = Generator(args.hf_dir, device, add_bos=True)

    def bar(total, desc):
        return tqdm(total=total, desc=f"rank {rank} {desc}", unit="item", disable=args.no_progress or rank != 0)
    results = {}
    for task in args.tasks:
        results[task] = evaluate(gen, task, task_settings(args, task), args.shots, rank, world, bar)
    if rank == 0:
        print(table(results))
        for task, r in results.items():
            for k, figures in r["shots"].items():
                if "tokenizer" in figures:
                    print(f"({task}: captions tokenized by the {figures['tokenizer']})")
                    break
        if args.output:
            write_output(args.output, results)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

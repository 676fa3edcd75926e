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

Per-task flags are --<task>-<name> (tasks: coco_caption vqav2 okvqa vizwiz gqa t2i); the plain
--<name> applies to every task that does not set its own. Prompts and file layouts:
megatron_vl/eval/tasks.py. CIDEr tokenizes with Java's PTB tokenizer (Java 17 is enough);
without Java a Python approximation runs and the output says so.
"""

import argparse
import json
import os
import sys

from megatron_vl.errors import UsageError, UserError, run_cli
from megatron_vl.eval.tasks import TASKS, missing_files

FILE_FLAGS = ("questions", "annotations", "train_questions", "train_annotations", "image_root", "image_pattern")


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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="a VL-GPT export (export-hf, with --image-tokenizer; t2i: --image-detokenizer)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tasks", nargs="+", choices=TASKS, help="tasks to run with the model")
    mode.add_argument("--task", choices=TASKS, help="with --results: the task whose results file to score")
    p.add_argument("--results", help="a results file in the task's official format (no model)")
    p.add_argument("--shots", nargs="+", type=non_negative_int, default=[0])
    for name in FILE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                       default="COCO_val2014_{image_id:012d}.jpg" if name == "image_pattern" else None)
        for task in TASKS:
            p.add_argument(f"--{task}-{name.replace('_', '-')}", dest=f"{task}.{name}", help=argparse.SUPPRESS)
    p.add_argument("--max-items", type=non_negative_int, default=0,
                   help="evaluate the first N items of each task (0: all); with --results: score against the first N")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0, help="k-shot support examples are drawn with this seed")
    p.add_argument("--fid-weights", help="t2i: torch-fidelity's Inception-v3 weights file (never downloaded)")
    p.add_argument("--clip-score-model", help="t2i: a local CLIPModel directory for the CLIP score")
    p.add_argument("--diffusion-steps", type=positive_int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--t2i-size", type=positive_int, help="t2i: generated image size (default: the UNet's)")
    p.add_argument("--no-java", action="store_true", help="CIDEr: the Python tokenizer even when Java is there")
    p.add_argument("--output", help="write every figure and answer here (JSON; scoring a --results file: its "
                   "figures). Never an input of the run; an existing file only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def task_args(args, task):
    """The namespace a task reads: its own --<task>-x flags over the plain --x ones."""
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if "." not in k})
    for name in FILE_FLAGS:
        own = getattr(args, f"{task}.{name}")
        if own is not None:
            setattr(ns, name, own)
    return ns


def input_paths(args):
    """Every file or directory the run reads (the --output guard keeps clear of them all)."""
    paths = [args.results, args.hf_dir, args.fid_weights, args.clip_score_model]
    for name in FILE_FLAGS:
        if name != "image_pattern":
            paths.append(getattr(args, name))
            paths += [getattr(args, f"{task}.{name}") for task in TASKS]
    return [p for p in paths if p]


def check_args(args):
    """Flag combinations refused before anything is read (exit 2)."""
    if args.results:
        if not args.task:
            raise UsageError("--results needs --task (the task whose results file it is)")
        if args.hf_dir:
            raise UsageError("--results scores a results file without a model: drop --hf-dir (or drop --results and "
                             "--task to run the model with --tasks)")
        tasks = [args.task]
    elif args.task:
        raise UsageError("--task names the task of a --results file; to run a model use --hf-dir and --tasks")
    elif not (args.hf_dir and args.tasks):
        raise UsageError("name --hf-dir and --tasks (or --task and --results to score a results file)")
    else:
        tasks = args.tasks
    for task in tasks:
        missing = missing_files(task, task_args(args, task))
        if missing:
            raise UsageError(f"--task{'s' if args.tasks else ''} {task} needs {' and '.join(missing)} (or "
                             f"{' and '.join(m.replace('--', f'--{task}-', 1) for m in missing)})")
    if args.output:
        from megatron_vl.atomic import guard_output
        guard_output(args.output, inputs=input_paths(args), overwrite=args.overwrite)


def write_output(path, data):
    from megatron_vl.atomic import atomic_open
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, default=str)
    print(f"wrote {path}")


def score_results(args) -> int:
    from megatron_vl.eval.tasks import REQUIRED_FILES, EvalFileError, FilesMismatch, load_items, official_line, \
        read_results, score
    ns = task_args(args, args.task)
    items = load_items(args.task, ns)
    if args.max_items:   # the items a --max-items run answered: the first N
        items = items[:args.max_items]
    if not items:
        files = " and ".join(f"--{n} {getattr(ns, n)}" for n in REQUIRED_FILES[args.task])
        raise EvalFileError(f"{files}: no questions to score (split 'test' for Karpathy files)")
    results = read_results(args.task, args.results)
    try:
        figures = score(args.task, results, items, use_java=not args.no_java)
    except FilesMismatch as exc:
        raise FilesMismatch(f"{exc} (--results {args.results})") from None
    print(official_line(args.task, figures))
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
        results[task] = evaluate(gen, task, task_args(args, task), args.shots, rank, world, bar)
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

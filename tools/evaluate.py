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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vl.eval.tasks import TASKS  # noqa: E402

FILE_FLAGS = ("questions", "annotations", "train_questions", "train_annotations", "image_root", "image_pattern")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="a VL-GPT export (export-hf, with --image-tokenizer; t2i: --image-detokenizer)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="tasks to run with the model")
    p.add_argument("--task", choices=TASKS, help="with --results: the task whose results file to score")
    p.add_argument("--results", help="a results file in the task's official format (no model)")
    p.add_argument("--shots", nargs="+", type=int, default=[0])
    for name in FILE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name,
                       default="COCO_val2014_{image_id:012d}.jpg" if name == "image_pattern" else None)
        for task in TASKS:
            p.add_argument(f"--{task}-{name.replace('_', '-')}", dest=f"{task}.{name}", help=argparse.SUPPRESS)
    p.add_argument("--max-items", type=int, default=0, help="evaluate the first N items of each task (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="k-shot support examples are drawn with this seed")
    p.add_argument("--fid-weights", help="t2i: torch-fidelity's Inception-v3 weights file (never downloaded)")
    p.add_argument("--clip-score-model", help="t2i: a local CLIPModel directory for the CLIP score")
    p.add_argument("--diffusion-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--t2i-size", type=int, help="t2i: generated image size (default: the UNet's)")
    p.add_argument("--no-java", action="store_true", help="CIDEr: the Python tokenizer even when Java is there")
    p.add_argument("--output", help="write every figure and answer here (JSON)")
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


def score_results(args) -> int:
    from megatron_vl.eval.tasks import load_items, official_line, read_results, score
    ns = task_args(args, args.task)
    results = read_results(args.task, args.results)
    figures = score(args.task, results, load_items(args.task, ns), use_java=not args.no_java)
    print(official_line(args.task, figures))
    if "tokenizer" in figures:
        print(f"(captions tokenized by the {figures['tokenizer']})")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.results:
            if not args.task:
                raise ValueError("--results needs --task")
            return score_results(args)
        if not (args.hf_dir and args.tasks):
            raise ValueError("name --hf-dir and --tasks (or --task and --results to score a results file)")
        return run_model(args)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_model(args) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from megatron_vl.eval.runner import evaluate, table
    from megatron_vl.generation import Generator
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
            with open(args.output, "w") as fh:
                json.dump(results, fh, indent=2, default=str)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

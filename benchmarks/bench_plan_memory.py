"""The planner's memory model against measured peaks of real CPU runs (2 gloo ranks, fp32):
ZeRO-1/2/3, TP=2, PP=2, LoRA on and off, recompute, on a model of ~13M parameters (hidden 512,
4 layers), under DeepSpeed's default buffers and under scaled-down ones.

    python benchmarks/bench_plan_memory.py [--hidden 512] [--workdir /tmp/bench_plan_memory]
    python benchmarks/bench_plan_memory.py --smoke     # same code path, tiny sizes (the test-suite's check)

"Measured" is the worst rank's peak of bytes held in CPU tensors (torch's allocator, every
thread; megatron_vl/testing/plan_measure.py) from just before the model is built through 3 training
steps. "Predicted" is the planner's total for that layout on the CPU code paths
(plan/model.py Runtime CPU_GLOO). tests/test_plan_memory.py asserts a subset within 10%.
"""

import argparse
import json
import os
import shutil
import tempfile

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

LAYOUTS = {"ZeRO-1": ["--zero-stage", 1], "ZeRO-2": ["--zero-stage", 2], "ZeRO-3": ["--zero-stage", 3],
           "TP=2 ZeRO-1": ["--tensor-model-parallel-size", 2], "PP=2 ZeRO-1": ["--pipeline-model-parallel-size", 2],
           "ZeRO-1 LoRA r=8": ["--zero-stage", 1, "--lora-rank", 8],
           "ZeRO-1 LoRA recompute": ["--zero-stage", 1, "--lora-rank", 8, "--recompute-activations"],
           "TP=2 LoRA r=8": ["--tensor-model-parallel-size", 2, "--lora-rank", 8],
           "ZeRO-3 LoRA r=8": ["--zero-stage", 3, "--lora-rank", 8]}
BUFFERS = {
    "DeepSpeed defaults": {},
    "buckets 1e6": {"zero_optimization": {"reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000,
                                          "stage3_param_persistence_threshold": 10_000}},
    "buckets 1e6, ZeRO-3 live 1e6": {"zero_optimization": {
        "reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000, "stage3_prefetch_bucket_size": 1_000_000,
        "stage3_max_live_parameters": 1_000_000, "stage3_max_reuse_distance": 1_000_000,
        "stage3_param_persistence_threshold": 10_000}},
}
# Smoke: a fresh corpus in a temporary directory (removed after), small buffers (DeepSpeed's
# defaults hold ~2 GB per rank).
SMOKE = {"hidden": 64, "layouts": ["ZeRO-3"], "buffers": ["buckets 1e6"], "iters": 1, "workdir": None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--workdir", default="/tmp/bench_plan_memory", help="holds the tiny corpus (built once; --smoke: a temporary directory)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), metavar="LAYOUT",
                   help=f"layouts to measure (default all: {', '.join(LAYOUTS)})")
    p.add_argument("--buffers", nargs="+", choices=list(BUFFERS), default=list(BUFFERS), metavar="BUFFERS",
                   help=f"DeepSpeed buffer settings to measure under (default all: {', '.join(BUFFERS)})")
    p.add_argument("--iters", type=int, default=3, help="training steps per run")
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    temporary = args.workdir is None
    if temporary:
        args.workdir = tempfile.mkdtemp(prefix="bench_plan_memory_")
    try:
        run(args)
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)


def run(args):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_vl_torch_extensions"))
    from megatron_vl.testing.tiny_data import build_vl_data, tiny_args   # the tiny corpus the tests build
    from megatron_vl.testing.plan_measure import measured_runs, predicted
    from megatron_vl.plan.model import total_bytes
    from megatron_vl.testing.distributed import run_distributed
    prefix = os.path.join(args.workdir, "data", "mmc4_text_document")
    if not os.path.isfile(prefix + ".idx"):
        os.makedirs(args.workdir, exist_ok=True)
        prefix = build_vl_data(args.workdir)
    h = args.hidden
    model = ["--hidden-size", h, "--ffn-hidden-size", h * 11 // 4, "--num-layers", 4, "--num-attention-heads", 8,
             "--num-query-groups", 8, "--global-batch-size", 4, "--micro-batch-size", 1, "--seq-length", 64,
             "--eval-iters", 0]
    runs = {}
    for buffers in args.buffers:
        zero = BUFFERS[buffers]
        path = os.path.join(args.workdir, f"ds_{len(runs)}.json")
        with open(path, "w") as fh:
            json.dump(zero, fh)
        for name in args.layouts:
            layout = LAYOUTS[name]
            if "live" in buffers and "ZeRO-3" not in name:
                continue
            runs[(buffers, name)] = [str(a) for a in tiny_args(prefix, *model, *layout, "--deepspeed_config", path,
                                                               iters=args.iters)]
    measured = run_distributed(measured_runs, 2, list(runs.values()), timeout=1800)
    print(f"{'buffers':<30} {'layout':<22} {'measured':>9} {'predicted':>9} {'error':>7}  peak at   (MiB)")
    for i, ((buffers, name), argv) in enumerate(runs.items()):
        peak = max(rank[i] for rank in measured)
        parts = predicted(argv, 2)
        total = total_bytes(parts)
        print(f"{buffers:<30} {name:<22} {peak / 2**20:9.1f} {total / 2**20:9.1f} {total / peak - 1:+7.1%}  "
              f"{parts['phase']}", flush=True)


if __name__ == "__main__":
    main()

"""The planner's memory model against measured peaks of real CPU runs (2 gloo ranks, fp32):
ZeRO-1/2/3, TP=2, LoRA on and off, on a model of ~13M parameters (hidden 512, 4 layers).

    python benchmarks/bench_plan_memory.py [--hidden 512] [--workdir /tmp/bench_plan_memory]

"Measured" is a rank's peak resident memory after 3 training steps minus its resident memory
just before the model was built, less the same figure for the same layout at hidden 64 (the
runtime's own cost: DeepSpeed's engine and shared-memory buffers, autograd, imports; what the
planner leaves to --reserved-gib). "Predicted" is the planner's total for that layout less its
total at hidden 64. The worst rank is compared.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))   # the tiny corpus the tests build

LAYOUTS = {"ZeRO-1": ["--zero-stage", 1], "ZeRO-2": ["--zero-stage", 2], "ZeRO-3": ["--zero-stage", 3],
           "TP=2 ZeRO-1": ["--tensor-model-parallel-size", 2], "ZeRO-1 LoRA r=8": ["--zero-stage", 1, "--lora-rank", 8],
           "ZeRO-3 LoRA r=8": ["--zero-stage", 3, "--lora-rank", 8]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--workdir", default="/tmp/bench_plan_memory")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_vl_torch_extensions"))
    from pretrain_helpers import build_vl_data, tiny_args
    from megatron_vl.plan.measure import measured_rank, predicted
    from megatron_vl.testing.distributed import run_distributed
    prefix = os.path.join(args.workdir, "data", "mmc4_text_document")
    if not os.path.isfile(prefix + ".idx"):
        os.makedirs(args.workdir, exist_ok=True)
        prefix = build_vl_data(args.workdir)

    def run(hidden, layout):
        model = ["--hidden-size", hidden, "--ffn-hidden-size", hidden * 11 // 4, "--num-layers", 4,
                 "--num-attention-heads", 8, "--num-query-groups", 8, "--global-batch-size", 4,
                 "--micro-batch-size", 1, "--seq-length", 64]
        argv = [str(a) for a in tiny_args(prefix, *model, *layout, iters=3)]
        measured = max(r["measured"] for r in run_distributed(measured_rank, 2, argv, timeout=600))
        return measured, sum(predicted(argv, 2).values())

    print(f"{'layout':<18} {'measured':>10} {'predicted':>10} {'error':>7}   (MiB, above the hidden-64 run)")
    for name, layout in LAYOUTS.items():
        big, small = run(args.hidden, layout), run(64, layout)
        measured, pred = (big[0] - small[0]) / 2**20, (big[1] - small[1]) / 2**20
        print(f"{name:<18} {measured:10.1f} {pred:10.1f} {pred / measured - 1:+7.1%}", flush=True)


if __name__ == "__main__":
    main()

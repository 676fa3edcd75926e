r"""Compare our LLaMA against transformers on random tokens (fp32 logits).

Run after every conversion; exits non-zero when the max abs difference exceeds --tolerance.

    python tools/check_parity.py --hf-dir /models/llama-7b
    torchrun --nproc_per_node 2 tools/check_parity.py --hf-dir /models/llama-7b --tensor-model-parallel-size 2
    torchrun --nproc_per_node 2 tools/check_parity.py --hf-dir /models/llama-7b --load ckpt/llama-7b-tp2 \
        --tensor-model-parallel-size 2
"""

import argparse
import sys

import torch.distributed as dist

from megatron_vl.convert.parity import max_logit_difference
from megatron_vl.errors import run_cli
from megatron_vl.parallel.state import ParallelState, init_distributed


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="transformers LlamaForCausalLM directory")
    p.add_argument("--load", help="compare this converted checkpoint (import-hf output) instead of "
                   "converting --hf-dir in memory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=1e-5)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    launch = init_distributed("gloo")
    rank, world = launch.rank, launch.world_size
    if world != args.tensor_model_parallel_size:
        p.error(f"launch with {args.tensor_model_parallel_size} processes (one per TP rank); got {world}")
    state = ParallelState.build(tp=args.tensor_model_parallel_size)
    diff = max_logit_difference(args.hf_dir, state, args.batches, args.batch_size, args.seq_length,
                                checkpoint=args.load)
    ok = diff <= args.tolerance
    if rank == 0:
        print(f"max abs logit difference (TP={state.tp}): {diff:.3e} "
              f"[{'OK' if ok else 'FAIL'}: tolerance {args.tolerance:.0e}]", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))

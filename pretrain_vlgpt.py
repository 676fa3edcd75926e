r"""Stage 2 of VL-GPT: multimodal pretraining of LLaMA (+ LoRA) on packed interleaved
image-text samples, on a DeepSpeed engine (ZeRO 0-3, pipeline stages, TP layers).

Launch it the way you launch Megatron-DeepSpeed (every flag: --help; a complete runnable
command on the sample data: examples/quickstart.sh, step "model 6"):

    # 2 CPU processes, tiny model, ZeRO-3 + LoRA
    deepspeed --num_gpus 2 pretrain_vlgpt.py --data-path data/mmc4_text_document \
        --vocab-size 258 --visual-embed-dim 64 --seq-length 512 --zero-stage 3 --lora-rank 8 \
        --micro-batch-size 2 --train-iters 50 --save ckpt --save-interval 25
    # the same with torchrun, TP=2
    torchrun --nproc_per_node 2 pretrain_vlgpt.py --data-path data/mmc4_text_document \
        --vocab-size 258 --tensor-model-parallel-size 2 --train-iters 50 --save ckpt
    # SLURM, one task per GPU (ranks from SLURM_PROCID/SLURM_LOCALID, master from the node list)
    srun --nodes 4 --ntasks-per-node 8 python pretrain_vlgpt.py ...   # examples/slurm/*.sbatch
    # MPI (Open MPI / MPICH; with mpi4py rank 0 broadcasts the rendezvous address)
    mpirun -np 16 python pretrain_vlgpt.py ...
    # resume: the same command with --load ckpt (the checkpoint 'latest' names, or --ckpt-step N);
    # another TP/PP/DP size or ZeRO stage than the run that wrote it is fine (weights, Adam
    # state, schedule and data position carry over)
    # which layout fits a cluster: python tools/plan_parallelism.py --preset A100-40GB --gpus 32 ...

Start from an HF LLaMA: tools/convert_checkpoint.py import-hf --hf-dir llama-7b --save llama-7b-mvl,
then --load llama-7b-mvl (a release checkpoint: weights only; [IMG]/[/IMG] rows are added at the
mean of the existing rows; the visual projection and regression head start fresh).
SIGTERM or SIGUSR1 saves at the next step boundary and exits 0 (SLURM: --signal=USR1@120).
At scale: examples/pretrain_vlgpt_7b.sh (deepspeed + hostfile), examples/slurm/, and
tools/convert_checkpoint.py export-hf for the Hugging Face export.
"""

import sys

from megatron_vl.training.pretrain import parser, run


def build_parser():
    return parser(__doc__)


if __name__ == "__main__":
    sys.exit(run(description=__doc__))

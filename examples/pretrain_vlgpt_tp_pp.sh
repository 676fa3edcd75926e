#!/usr/bin/env bash
# VL-GPT stage 2 with tensor x pipeline x data parallelism and ZeRO-1 — for when ZeRO-3's
# per-layer all-gathers saturate the inter-node network (full fine-tuning of the 7B model,
# or slow interconnects). 32 GPUs = TP 2 (inside a node, NVLink) x PP 4 x DP 4.
#
#   HOSTFILE=hostfile bash examples/pretrain_vlgpt_tp_pp.sh
#
# Rules the run checks before starting: heads (32) and query groups divisible by TP, layers
# (32) by PP, global batch by micro-batch x DP; ZeRO-2/3 cannot be combined with pipelines.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-hostfile}
NUM_NODES=${NUM_NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
DATA=${DATA:-/datasets/vlgpt}
LLAMA_CKPT=${LLAMA_CKPT:-/checkpoints/llama-7b-mvl-tp2-pp4}   # import-hf with the same TP/PP
CKPT_DIR=${CKPT_DIR:-/checkpoints/vlgpt-7b-tp2-pp4}

TP=2; PP=4                                   # DP = 32 / (TP x PP) = 4
args=(
    --model-preset vlgpt-7.5b                # LLaMA-7B + [IMG]/[/IMG], N=32 of d=4096, 512 tokens
    --data-path 0.5 "$DATA/mmc4_text_document" 0.5 "$DATA/obelics_text_document"
    --split 998,2,0 --data-cache-path "$CKPT_DIR/index-cache" --num-workers 4
    --reset-attention-mask
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --zero-stage 1                           # optimizer states sharded over the 4 DP replicas
    --deepspeed_config examples/ds_configs/zero1_bf16_pipeline.json   # fp32 gradient accumulation
    # 4 DP ranks x micro 4 x 256 micro-batches per step = 4096: many micro-batches keep the
    # 4 pipeline stages busy (bubble ~ (PP-1) / micro-batches)
    --micro-batch-size 4 --global-batch-size 4096 --train-iters 20000
    --lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 1000 --min-lr 2e-5
    --weight-decay 0.05 --adam-beta2 0.95 --bf16
    --load "$LLAMA_CKPT" --save "$CKPT_DIR" --save-interval 500 --keep-last 3
    --log-interval 10 --eval-interval 1000 --tensorboard-dir "$CKPT_DIR/tensorboard" --peak-tflops 312
)

deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port 29500 \
    pretrain_vlgpt.py "${args[@]}"

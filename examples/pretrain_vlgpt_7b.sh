#!/usr/bin/env bash
# VL-GPT stage 2 (multimodal pretraining) at the paper's scale: LLaMA-7B + LoRA, packed
# 512-token interleaved image-text samples, global batch 4096, 20k iterations, lr 2e-4 with
# cosine decay, bf16, DeepSpeed ZeRO-3, 32 A100-80GB (4 nodes x 8) through the deepspeed
# launcher (it reaches the other nodes over passwordless ssh / pdsh).
#
# Before this:
#   1. the language model:  python tools/convert_checkpoint.py import-hf \
#          --hf-dir /models/llama-7b-hf --save $LLAMA_CKPT
#   2. the data:  bash examples/preprocess_mmc4.sh; bash examples/preprocess_obelics.sh
#      (image-text pairs the same way with --input-format wds-pairs); both end by extracting
#      the image tokenizer's features (N=32 embeddings of width d per image). MMC4 and OBELICS
#      are cut there by the paper's rule (--doc-sampling paper: per document one subsequence
#      of <= 512 positions, <= 5 images chosen at random with their sentences); training reads
#      each subsequence whole, several per 512-position row under --reset-attention-mask.
# Then, on the first host of the hostfile, from the repository root:
#   HOSTFILE=hostfile bash examples/pretrain_vlgpt_7b.sh
# Run the same command again to resume: --save's 'latest' wins over --load's weights.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-hostfile}             # one "hostname slots=8" line per node
NUM_NODES=${NUM_NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}

DATA=${DATA:-/datasets/vlgpt}              # *_text_document prefixes with image features
LLAMA_CKPT=${LLAMA_CKPT:-/checkpoints/llama-7b-mvl}   # release checkpoint from import-hf
CKPT_DIR=${CKPT_DIR:-/checkpoints/vlgpt-7b-stage2}
LOG_DIR=${LOG_DIR:-$CKPT_DIR/tensorboard}

# 32 ranks x micro-batch 8 x 16 accumulation steps = 4096 samples of 512 tokens per step.
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=4096

args=(
    # --- model: LLaMA-7B (HF config: 32 layers, 4096 wide, 32 heads, no GQA, eps 1e-6), its
    # vocabulary + [IMG], [/IMG] (32002; new rows start at the mean), N=32 visual embeddings of
    # d=4096 per image (as extract_image_features.py made them), 512 tokens: examples/configs/vlgpt-7.5b.yaml
    --model-preset vlgpt-7.5b
    --max-images-per-sample 5
    --visual-loss-weight 1.0                 # total = CE(text) + weight x MSE(visual)
    # --- data ---
    --data-path 0.4 "$DATA/mmc4_text_document" 0.3 "$DATA/obelics_text_document"
                0.3 "$DATA/pairs_text_document"   # blend weights: ours, tune to taste
    --split 998,2,0
    --reset-attention-mask                   # one subsequence (document) per attention span, several per row
    --data-cache-path "$CKPT_DIR/index-cache"      # sample-order indices, built once by rank 0
    --num-workers 4
    # --- LoRA on every projection; the base stays frozen (visual ends and [IMG] rows train) ---
    --lora-rank 32 --lora-alpha 32 --lora-dropout 0.05
    --lora-target-modules q k v o gate up down
    # --- optimisation: the paper's lr, schedule, batch and length ---
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --train-iters 20000
    --lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 1000 --min-lr 2e-5
    --weight-decay 0.05 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    --bf16
    --recompute-activations                  # 8 x 512 tokens x 32 layers of activations otherwise
    # --- parallelism: pure data parallel over 32 ranks, parameters sharded by ZeRO-3 ---
    --zero-stage 3 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --deepspeed_config examples/ds_configs/zero3_bf16.json   # bucket sizes, overlap; "auto" = from flags
    # --- checkpoints and logs ---
    --load "$LLAMA_CKPT" --save "$CKPT_DIR" --save-interval 500 --keep-last 3
    --log-interval 10 --eval-interval 1000 --eval-iters 20
    --tensorboard-dir "$LOG_DIR"
    --peak-tflops 312                        # A100 bf16 dense peak, for the MFU column
)

deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    pretrain_vlgpt.py "${args[@]}"

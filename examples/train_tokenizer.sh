#!/usr/bin/env bash
# VL-GPT stage 1 at the paper's settings: the image tokenizer-detokenizer trained on CC3M +
# LAION-Aesthetics + LAION-COCO image-text pairs (img2dataset webdataset shards), AdamW lr 2e-4
# with cosine decay, global batch 1024, 10,000 iterations, 8 x A100-40GB, one node, deepspeed
# launcher.
#
# Local directories it needs (nothing is downloaded at run time):
#   CLIP_MODEL  openai/clip-vit-large-patch14 (transformers format, with preprocessor_config.json)
#   SD_MODEL    runwayml/stable-diffusion-v1-5 in the diffusers layout (text_encoder/, tokenizer/
#               for the targets; unet/, vae/ only for decoding)
#   IP_ADAPTER  h94/IP-Adapter's models/ folder: ip-adapter-plus_sd15.bin (or .safetensors) and
#               image_encoder/ (the ViT-H/14 CLIPVisionModelWithProjection)
# Optional, once before training (the ViT-H forward is most of a step):
#   python tools/precompute_tokenizer_targets.py --train-shards ... --sd-model $SD_MODEL \
#       --ip-adapter $IP_ADAPTER --targets-dir $TARGETS      and then TARGETS=... this script
# Run from the repository root; run it again to resume (--load = --save).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS:-8}
MODELS=${MODELS:-/models}
CLIP_MODEL=${CLIP_MODEL:-$MODELS/clip-vit-large-patch14}
SD_MODEL=${SD_MODEL:-$MODELS/stable-diffusion-v1-5}
IP_ADAPTER=${IP_ADAPTER:-$MODELS/IP-Adapter/models}
DATA=${DATA:-/datasets/pairs}
CKPT_DIR=${CKPT_DIR:-/checkpoints/vlgpt-stage1}
TARGETS=${TARGETS:-}

# 8 ranks x micro-batch 32 x 4 accumulation steps = 1024 pairs per step.
MICRO_BATCH=${MICRO_BATCH:-32}

args=(
    # --- the frozen parts, from local directories ---
    --clip-model "$CLIP_MODEL" --clip-layer penultimate
    --sd-model "$SD_MODEL" --ip-adapter "$IP_ADAPTER" --ip-adapter-weight ip-adapter-plus_sd15.bin
    # --- what trains: tokenizer transformer (N=32 embeddings of d=4096, LLaMA-7B's width) + detokenizer ---
    --num-image-tokens 32 --visual-embed-dim 4096 --tokenizer-layers 2 --tokenizer-heads 16
    --detokenizer-width 1024 --detokenizer-layers 4 --detokenizer-heads 16
    --lambda-image 1.0 --lambda-text 1.0
    # --- data: blend weights are ours (the paper does not give them) ---
    --train-shards 0.4 "$DATA/cc3m/{00000..00331}.tar" 0.3 "$DATA/laion-aesthetics/{00000..09999}.tar"
                   0.3 "$DATA/laion-coco/{00000..09999}.tar"
    --shuffle-buffer 5000 --prefetch 4
    # --- optimisation (paper) ---
    --lr 2e-4 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 500 --weight-decay 0.05
    --adam-beta1 0.9 --adam-beta2 0.98 --clip-grad 1.0
    --micro-batch-size "$MICRO_BATCH" --global-batch-size 1024 --train-iters 10000 --bf16 --zero-stage 2
    # --- checkpoints and logs ---
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval 1000 --keep-last 3
    --log-interval 10 --tensorboard-dir "$CKPT_DIR/tensorboard"
)
if [ -n "$TARGETS" ]; then
    args+=(--targets-dir "$TARGETS")
fi

deepspeed --num_gpus "$GPUS" train_tokenizer.py "${args[@]}"
python tools/export_tokenizer.py --load "$CKPT_DIR" --save "$CKPT_DIR/export"

#!/usr/bin/env bash
# VL-GPT stage 3 (instruction tuning, VL-GPT-I) at the paper's settings: LoRA, lr 5e-5, global
# batch 512, 10,000 iterations, 4 GPUs (one node, deepspeed launcher), on conversation, caption
# and image-editing data reorganised into conversations, the loss on answers only.
#
# Before this (from the repository root):
#   1. stage 2: examples/pretrain_vlgpt_7b.sh -> $STAGE2 (a training checkpoint; its LoRA is
#      merged here and stage 3 trains adapters of its own);
#   2. stage 1's image tokenizer exported: tools/export_tokenizer.py -> $STAGE1/image_tokenizer;
#   3. the raw data: LLaVA-Instruct (llava_v1_5_mix665k.json + images), SVIT (LLaVA format), COCO
#      Karpathy split (dataset_coco.json + train2014/), InstructPix2Pix and MagicBrush parquet.
# Run it again to resume (--save's stage-3 checkpoint wins over --load's stage-2 weights).
set -euo pipefail
cd "$(dirname "$0")/.."

RAW=${RAW:-/datasets/instruct}
DATA=${DATA:-/datasets/vlgpt-instruct}
TOKENIZER=${TOKENIZER:-/models/llama-7b-hf/tokenizer.model}
STAGE1=${STAGE1:-/checkpoints/vlgpt-stage1/export}
STAGE2=${STAGE2:-/checkpoints/vlgpt-7b-stage2}
CKPT_DIR=${CKPT_DIR:-/checkpoints/vlgpt-7b-stage3}
TEMPLATE=${TEMPLATE:-vicuna_v1}
GPUS=${GPUS:-4}

prep=(--tokenizer-model "$TOKENIZER" --prepend-bos --conversation-template "$TEMPLATE" --workers 16)
if [ ! -f "$DATA/magicbrush_text_document.meta.json" ]; then
    python tools/preprocess_data.py --input-format llava --input "$RAW/llava/llava_v1_5_mix665k.json" \
        --image-root "$RAW/llava/images" --output-prefix "$DATA/llava" "${prep[@]}"
    python tools/preprocess_data.py --input-format llava --input "$RAW/svit/*.json" \
        --image-root "$RAW/svit/images" --output-prefix "$DATA/svit" "${prep[@]}"
    python tools/preprocess_data.py --input-format coco-captions --input "$RAW/coco/dataset_coco.json" \
        --image-root "$RAW/coco" --output-prefix "$DATA/coco-captions" "${prep[@]}"
    python tools/preprocess_data.py --input-format instructpix2pix --input "$RAW/instructpix2pix/*.parquet" \
        --output-prefix "$DATA/instructpix2pix" "${prep[@]}"
    python tools/preprocess_data.py --input-format magicbrush --input "$RAW/magicbrush/*.parquet" \
        --output-prefix "$DATA/magicbrush" "${prep[@]}"
    python tools/extract_image_features.py --image-tokenizer "$STAGE1/image_tokenizer" --batch-size 256 \
        --data-prefix "$DATA/llava_text_document" "$DATA/svit_text_document" "$DATA/coco-captions_text_document" \
                      "$DATA/instructpix2pix_text_document" "$DATA/magicbrush_text_document"
fi

# 4 ranks x micro-batch 8 x 16 accumulation steps = 512 samples per step.
args=(
    # --- the stage-2 architecture: LLaMA-7B + the visual ends (examples/configs/vlgpt-7.5b.yaml) ---
    --model-preset vlgpt-7.5b --max-images-per-sample 5
    # --- data: blend weights are ours (the paper does not give them) ---
    --data-path 0.35 "$DATA/llava_text_document" 0.2 "$DATA/svit_text_document"
                0.15 "$DATA/coco-captions_text_document" 0.15 "$DATA/instructpix2pix_text_document"
                0.15 "$DATA/magicbrush_text_document"
    --split 998,2,0 --reset-attention-mask --pack --data-cache-path "$CKPT_DIR/index-cache"
    # --- optimisation (paper: LoRA, lr 5e-5, batch 512, 10k iterations) ---
    --lora-rank 16 --lora-alpha 32 --lr 5e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 200
    --micro-batch-size 8 --global-batch-size 512 --train-iters 10000 --bf16 --zero-stage 2
    --recompute-activations
    # --- checkpoints: weights of stage 2, then this run's own ---
    --load "$STAGE2" --save "$CKPT_DIR" --save-interval 1000 --keep-last 3
    --log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CKPT_DIR/tensorboard"
)
deepspeed --num_gpus "$GPUS" finetune_instruct.py "${args[@]}"
python tools/convert_checkpoint.py export-hf --load "$CKPT_DIR" --save "$CKPT_DIR/hf" \
    --image-tokenizer "$STAGE1/image_tokenizer" --image-detokenizer "$STAGE1/image_detokenizer"

#!/usr/bin/env bash
# CPU quickstart on the embedded tiny default, from a fresh machine (installs what it needs):
#   sample corpus in the three real formats (MMC4, OBELICS, webdataset pairs) -> preprocess
#   each -> stage 1: the image tokenizer-detokenizer trained on the pairs (tiny random CLIP,
#   SD 1.5 and IP-Adapter-Plus in their real layouts) -> image features from the trained
#   tokenizer -> a tiny HF LLaMA imported (checked against transformers at TP=2) -> stage 2:
#   VL-GPT pretrained on 2 CPU processes -> exported to Hugging Face format -> loaded with
#   transformers for a greedy continuation and a generated image -> stage 3: instruction tuning on the sample's
#   LLaVA / COCO-captions / InstructPix2Pix / MagicBrush data, exported, answering a question ->
#   an image reconstructed through the detokenizer and diffusers -> loss curves as a PNG.
#   About 3 minutes on 2 cores once installed.
#   OUT=dir bash examples/quickstart.sh     (default: quickstart_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart_out}
ITERS=${ITERS:-200}
STAGE1_ITERS=${STAGE1_ITERS:-40}
STAGE3_ITERS=${STAGE3_ITERS:-40}
PIP="python -m pip install --disable-pip-version-check -q"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
step() { printf '\n== [%s] %s\n' "$(date +%T)" "$*"; }
# $OUT is emptied first, but only if a quickstart made it (its marker file) or it is empty or missing.
MARKER=.megatron-vl-quickstart
if [ -e "$OUT" ] || [ -L "$OUT" ]; then
    if ! [ -f "$OUT/$MARKER" ] && { ! [ -d "$OUT" ] || [ -L "$OUT" ] || [ -n "$(ls -A "$OUT")" ]; }; then
        echo "error: OUT=$OUT exists and was not made by this quickstart (no $OUT/$MARKER): not removing it; choose another OUT=dir" >&2
        exit 1
    fi
fi

step "0. installing CPU torch, deepspeed (no compiled ops) and megatron-vl"
$PIP "torch==2.13.0"
DS_BUILD_OPS=0 $PIP -e .

rm -rf "$OUT" && mkdir -p "$OUT" && echo "made by examples/quickstart.sh, which may delete this folder" > "$OUT/$MARKER"
step "1. sample corpus: MMC4 jsonl.zip + images, OBELICS parquet, webdataset pairs, tokenizer -> $OUT/sample"
python tools/make_sample_data.py --output "$OUT/sample" --pair-shards 2

step "2. preprocess each format -> $OUT/data/*_text_document.{bin,idx} + image sidecars"
common=(--tokenizer-model "$OUT/sample/tokenizer.model" --prepend-bos --append-eod --workers 2 --no-progress)
python tools/preprocess_data.py --input-format mmc4 --input "$OUT/sample/mmc4/*.jsonl.zip" \
    --image-root "$OUT/sample/mmc4/images" --min-sim 0.2 --output-prefix "$OUT/data/mmc4" "${common[@]}" \
    --doc-sampling paper
python tools/preprocess_data.py --input-format obelics --input "$OUT/sample/obelics/*.parquet" \
    --output-prefix "$OUT/data/obelics" "${common[@]}" --doc-sampling paper
python tools/preprocess_data.py --input-format wds-pairs --input "$OUT/sample/pairs/*.tar" \
    --output-prefix "$OUT/data/pairs" "${common[@]}"

step "3. stage 1: train the image tokenizer-detokenizer on the pairs (2 CPU processes, deepspeed launcher)"
python tools/make_tiny_stage1_models.py --save "$OUT/tiny-models"
deepspeed --num_gpus 2 train_tokenizer.py --clip-model "$OUT/tiny-models/clip" --sd-model "$OUT/tiny-models/sd" \
    --ip-adapter "$OUT/tiny-models/ip-adapter" --ip-adapter-weight ip-adapter-plus_sd15.safetensors \
    --train-shards "$OUT/sample/pairs/{00000..00001}.tar" --num-image-tokens 32 --visual-embed-dim 64 \
    --tokenizer-heads 2 --detokenizer-width 64 --detokenizer-heads 4 --detokenizer-layers 2 \
    --micro-batch-size 8 --train-iters "$STAGE1_ITERS" --lr 2e-3 --lr-warmup-iters 5 --log-interval 10 \
    --shuffle-buffer 64 --save "$OUT/ckpt-stage1" 2>&1 | tee "$OUT/stage1.log"
python tools/export_tokenizer.py --load "$OUT/ckpt-stage1" --save "$OUT/stage1"

step "4. image features (N=32 embeddings of width d=64 per image) from the trained image tokenizer"
python tools/extract_image_features.py --image-tokenizer "$OUT/stage1/image_tokenizer" --no-progress \
    --data-prefix "$OUT/data/mmc4_text_document" "$OUT/data/obelics_text_document" "$OUT/data/pairs_text_document"

step "5. a tiny random HF LLaMA (the sample tokenizer's 256 pieces) -> import-hf -> parity with transformers at TP=2"
python tools/make_tiny_llama.py --save "$OUT/hf-llama" --model-preset tiny --vocab-size 256 \
    --max-position-embeddings 512
python tools/convert_checkpoint.py import-hf --hf-dir "$OUT/hf-llama" --save "$OUT/ckpt-llama"
python -m torch.distributed.run --nproc_per_node 2 tools/check_parity.py --hf-dir "$OUT/hf-llama" \
    --load "$OUT/ckpt-llama" --tensor-model-parallel-size 2

step "6. pretrain VL-GPT: 2 CPU processes (torchrun), ZeRO-1, $ITERS iterations on the blend 0.4 mmc4 / 0.3 obelics / 0.3 pairs \
([IMG]/[/IMG] rows added at the mean; visual projection and regression head start fresh)"
python -m torch.distributed.run --nproc_per_node 2 pretrain_vlgpt.py \
    --data-path 0.4 "$OUT/data/mmc4_text_document" 0.3 "$OUT/data/obelics_text_document" \
                0.3 "$OUT/data/pairs_text_document" --split 95,5,0 \
    --model-preset tiny --reset-attention-mask \
    --micro-batch-size 2 --global-batch-size 4 --train-iters "$ITERS" --lr 3e-3 --lr-warmup-iters 10 --min-lr 3e-4 \
    --num-workers 0 --log-interval 10 --eval-interval 50 --eval-iters 2 \
    --load "$OUT/ckpt-llama" --save "$OUT/ckpt-vlgpt" --save-interval 100 --tensorboard-dir "$OUT/tensorboard" \
    2>&1 | tee "$OUT/pretrain.log"

step "7. export the checkpoint to Hugging Face format -> $OUT/vlgpt-hf"
python tools/convert_checkpoint.py export-hf --load "$OUT/ckpt-vlgpt" --save "$OUT/vlgpt-hf" \
    --image-tokenizer "$OUT/stage1/image_tokenizer" --image-detokenizer "$OUT/stage1/image_detokenizer"

step "8. generate from the export (transformers + its visual ends): text, and images out through the detokenizer + diffusers"
python tools/generate.py --hf-dir "$OUT/vlgpt-hf" --max-new-tokens 16 --no-add-bos \
    --prompt "This page shows a few drawings. The picture shows a red circle above a" \
    --prompt "The picture shows a green"
python tools/generate.py --hf-dir "$OUT/vlgpt-hf" --no-add-bos --prompt "A photo of a red circle" --text-to-image \
    --image-out "$OUT/generated" --diffusion-steps 10

step "9. stage 3: instruction data (LLaVA json, COCO Karpathy json, InstructPix2Pix and MagicBrush parquet) -> \
conversations with an answer-only loss mask -> features -> finetune_instruct.py from the stage-2 checkpoint (LoRA) -> export -> an answer"
for fmt in llava coco-captions instructpix2pix magicbrush; do
    case $fmt in
        llava) input=("$OUT/sample/llava/llava_instruct.json" --image-root "$OUT/sample/llava/images");;
        coco-captions) input=("$OUT/sample/coco/dataset_coco.json" --image-root "$OUT/sample/coco");;
        *) input=("$OUT/sample/$fmt/train-00000.parquet");;
    esac
    python tools/preprocess_data.py --input-format "$fmt" --input "${input[@]}" --conversation-template vicuna_v1 \
        --output-prefix "$OUT/data/$fmt" --tokenizer-model "$OUT/sample/tokenizer.model" --prepend-bos --no-progress
done
python tools/extract_image_features.py --image-tokenizer "$OUT/stage1/image_tokenizer" --no-progress \
    --data-prefix "$OUT/data/llava_text_document" "$OUT/data/coco-captions_text_document" \
                  "$OUT/data/instructpix2pix_text_document" "$OUT/data/magicbrush_text_document"
python -m torch.distributed.run --nproc_per_node 2 finetune_instruct.py \
    --data-path 0.4 "$OUT/data/llava_text_document" 0.2 "$OUT/data/coco-captions_text_document" \
                0.2 "$OUT/data/instructpix2pix_text_document" 0.2 "$OUT/data/magicbrush_text_document" --split 95,5,0 \
    --model-preset tiny \
    --micro-batch-size 2 --global-batch-size 4 --train-iters "$STAGE3_ITERS" --lr 2e-3 --lr-warmup-iters 5 \
    --num-workers 0 --log-interval 10 --eval-interval 1000 --eval-iters 2 \
    --load "$OUT/ckpt-vlgpt" --save "$OUT/ckpt-instruct" 2>&1 | tee "$OUT/finetune.log"
python tools/convert_checkpoint.py export-hf --load "$OUT/ckpt-instruct" --save "$OUT/vlgpt-i-hf" --merge-lora \
    --image-tokenizer "$OUT/stage1/image_tokenizer" --image-detokenizer "$OUT/stage1/image_detokenizer"
python tools/generate.py --hf-dir "$OUT/vlgpt-i-hf" --max-new-tokens 12 --no-add-bos \
    --prompt "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
detailed, and polite answers to the user's questions. USER: Name a shape that could be red. ASSISTANT:"

step "10. an image of the corpus reconstructed by stage 1: tokenizer -> detokenizer -> SD 1.5 + IP-Adapter-Plus"
python tools/reconstruct_images.py --export "$OUT/stage1" --images "$OUT/sample/mmc4/images/$(ls "$OUT/sample/mmc4/images" | head -1)" \
    --mode all --steps 10 --output "$OUT/reconstruction"

step "11. loss curves -> $OUT/loss.png"
python tools/plot_loss.py --log "$OUT/pretrain.log" --output "$OUT/loss.png" --title "quickstart: tiny VL-GPT on 2 CPU processes"
step "done: outputs in $OUT/ (export: $OUT/vlgpt-hf, stage 1: $OUT/stage1, stage 3: $OUT/vlgpt-i-hf, reconstruction: $OUT/reconstruction, curves: $OUT/loss.png)"

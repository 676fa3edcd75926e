#!/usr/bin/env bash
# CPU quickstart on the embedded tiny default; installs what it needs, then:
#   data: sample corpus in the three real formats -> preprocess each -> image features from an
#         untrained image tokenizer on a tiny random CLIP -> packed 512-position samples
#   model: tiny random LLaMA (HF format) -> import at TP=2 x PP=2 -> parity with transformers on
#         2 processes -> export back to HF (bit-identical) -> step time against transformers
#   pretraining: a tiny HF LLaMA imported -> VL-GPT pretrained on the blend (2 processes, ZeRO-1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart_out}
PIP="python -m pip install --disable-pip-version-check -q"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
step() { printf '\n== %s\n' "$*"; }

step "installing CPU torch, deepspeed (no compiled ops) and megatron-vl"
$PIP "torch==2.13.0"
DS_BUILD_OPS=0 $PIP -e .

rm -rf "$OUT" && mkdir -p "$OUT"
step "data 1. sample corpus: MMC4 jsonl.zip + images, OBELICS parquet, webdataset pairs -> $OUT/sample"
python tools/make_sample_data.py --output "$OUT/sample"

step "data 2. preprocess each format -> $OUT/data/*_text_document.{bin,idx} + image sidecars"
common=(--tokenizer-model "$OUT/sample/tokenizer.model" --append-eod --workers 2)
python tools/preprocess_data.py --input-format mmc4 --input "$OUT/sample/mmc4/*.jsonl.zip" \
    --image-root "$OUT/sample/mmc4/images" --min-sim 0.2 --output-prefix "$OUT/data/mmc4" "${common[@]}"
python tools/preprocess_data.py --input-format obelics --input "$OUT/sample/obelics/*.parquet" \
    --output-prefix "$OUT/data/obelics" "${common[@]}"
python tools/preprocess_data.py --input-format wds-pairs --input "$OUT/sample/pairs/*.tar" \
    --output-prefix "$OUT/data/pairs" "${common[@]}"

step "data 3. image features (N=32, d=64) from an untrained image tokenizer on a tiny random CLIP"
python tools/make_tiny_clip.py --save "$OUT/tiny-clip"
python tools/extract_image_features.py --init-from-clip "$OUT/tiny-clip" --num-image-tokens 32 --embed-dim 64 \
    --tokenizer-heads 2 --save-image-tokenizer "$OUT/image-tokenizer" \
    --data-prefix "$OUT/data/mmc4_text_document" "$OUT/data/obelics_text_document" "$OUT/data/pairs_text_document"

step "data 4. packed samples from the blend 0.4 mmc4 0.3 obelics 0.3 pairs"
python - "$OUT/data" <<'PY'
import sys
from megatron_vl.data.dataset import BlendedDataset, PackedDataset, parse_blend
from megatron_vl.data.packing import PackingConfig
d = sys.argv[1]
prefixes, weights = parse_blend(["0.4", f"{d}/mmc4_text_document", "0.3", f"{d}/obelics_text_document",
                                 "0.3", f"{d}/pairs_text_document"])
cfg = PackingConfig(seq_length=512, num_image_tokens=32, max_images=5, seed=1234)
parts = [PackedDataset(p, cfg, num_samples=40) for p in prefixes]
blend = BlendedDataset(parts, weights, 64)
s = blend[0]
print(f"{len(blend)} samples of {len(s['tokens'])} positions; sample 0: {s['num_images']} images, "
      f"{int(s['visual_mask'].sum())} visual positions, {int((s['labels'] != -100).sum())} text targets, "
      f"{int(s['regression_mask'].sum())} regression targets, features {tuple(s['features'].shape)}")
PY

step "model 1. tiny random LLaMA -> $OUT/hf-tiny"
python tools/make_tiny_llama.py --save "$OUT/hf-tiny" --num-layers 2 --hidden-size 64 --ffn-hidden-size 176 \
    --num-attention-heads 4 --num-query-groups 2 --vocab-size 1003 --max-position-embeddings 256

step "model 2. import-hf at TP=2, PP=2 -> $OUT/ckpt-tp2-pp2"
python tools/convert_checkpoint.py import-hf --hf-dir "$OUT/hf-tiny" --save "$OUT/ckpt-tp2-pp2" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

step "model 3. parity against transformers, 2 tensor-parallel processes (converted checkpoint)"
python -m torch.distributed.run --nproc_per_node 2 tools/check_parity.py --hf-dir "$OUT/hf-tiny" \
    --load "$OUT/ckpt-tp2-pp2" --tensor-model-parallel-size 2

step "model 4. export-hf -> $OUT/hf-export, compare with the original"
python tools/convert_checkpoint.py export-hf --load "$OUT/ckpt-tp2-pp2" --save "$OUT/hf-export"
python - "$OUT/hf-tiny" "$OUT/hf-export" <<'PY'
import sys, torch
from transformers import LlamaForCausalLM
a, b = (LlamaForCausalLM.from_pretrained(d).state_dict() for d in sys.argv[1:])
same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
print(f"{len(a)} tensors, bit-identical after import -> export: {same}")
sys.exit(0 if same else 1)
PY

step "model 5. step time, ours vs transformers (hidden 256, 4 layers, seq 256; benchmarks/ has the full one)"
python benchmarks/bench_llama_step.py --hidden 256 --ffn 704 --layers 4 --heads 4 --kv-heads 2 --vocab 8000 \
    --seq 256 --batch 2 --repeats 3 --warmup 1
step "model 6. pretrain VL-GPT from a tiny HF LLaMA: import (the sample tokenizer's 256 pieces; [IMG]/[/IMG] rows \
are added at the mean of the others), then 2 CPU processes (torchrun), ZeRO-1, on the blend"
python tools/make_tiny_llama.py --save "$OUT/hf-tiny-256" --num-layers 2 --hidden-size 64 --ffn-hidden-size 176 \
    --num-attention-heads 4 --num-query-groups 2 --vocab-size 256 --max-position-embeddings 512
python tools/convert_checkpoint.py import-hf --hf-dir "$OUT/hf-tiny-256" --save "$OUT/ckpt-llama-256"
python -m torch.distributed.run --nproc_per_node 2 pretrain_vlgpt.py \
    --data-path 0.4 "$OUT/data/mmc4_text_document" 0.3 "$OUT/data/obelics_text_document" \
                0.3 "$OUT/data/pairs_text_document" --split 95,5,0 \
    --num-layers 2 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 4 --num-query-groups 2 \
    --vocab-size 258 --seq-length 512 --visual-embed-dim 64 --num-image-tokens 32 \
    --micro-batch-size 2 --global-batch-size 4 --train-iters 40 --lr 2e-3 --lr-warmup-iters 4 --min-lr 2e-4 \
    --num-workers 0 --log-interval 5 --eval-interval 20 --eval-iters 2 \
    --load "$OUT/ckpt-llama-256" --save "$OUT/ckpt-vlgpt" --save-interval 20 --tensorboard-dir "$OUT/tensorboard"
step "done: outputs in $OUT/"

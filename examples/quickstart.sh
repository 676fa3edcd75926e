#!/usr/bin/env bash
# CPU quickstart on the embedded tiny default; installs what it needs, then:
#   1. writes a tiny random LLaMA in Hugging Face format (GQA, vocabulary 1003: not a multiple of 128)
#   2. imports it into a TP=2 x PP=2 megatron-vl checkpoint
#   3. checks logit parity against transformers with 2 tensor-parallel processes (torchrun)
#   4. exports back to Hugging Face format and checks the tensors are bit-identical
#   5. times a forward+backward step of our model against transformers (small config)
# Pretraining on sample data joins this script when the pretraining pipeline lands.
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
step "1. tiny random LLaMA -> $OUT/hf-tiny"
python tools/make_tiny_llama.py --save "$OUT/hf-tiny" --num-layers 2 --hidden-size 64 --ffn-hidden-size 176 \
    --num-attention-heads 4 --num-query-groups 2 --vocab-size 1003 --max-position-embeddings 256

step "2. import-hf at TP=2, PP=2 -> $OUT/ckpt-tp2-pp2"
python tools/convert_checkpoint.py import-hf --hf-dir "$OUT/hf-tiny" --save "$OUT/ckpt-tp2-pp2" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

step "3. parity against transformers, 2 tensor-parallel processes (converted checkpoint)"
python -m torch.distributed.run --nproc_per_node 2 tools/check_parity.py --hf-dir "$OUT/hf-tiny" \
    --load "$OUT/ckpt-tp2-pp2" --tensor-model-parallel-size 2

step "4. export-hf -> $OUT/hf-export, compare with the original"
python tools/convert_checkpoint.py export-hf --load "$OUT/ckpt-tp2-pp2" --save "$OUT/hf-export"
python - "$OUT/hf-tiny" "$OUT/hf-export" <<'PY'
import sys, torch
from transformers import LlamaForCausalLM
a, b = (LlamaForCausalLM.from_pretrained(d).state_dict() for d in sys.argv[1:])
same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
print(f"{len(a)} tensors, bit-identical after import -> export: {same}")
sys.exit(0 if same else 1)
PY

step "5. step time, ours vs transformers (hidden 256, 4 layers, seq 256; benchmarks/ has the full one)"
python benchmarks/bench_llama_step.py --hidden 256 --ffn 704 --layers 4 --heads 4 --kv-heads 2 --vocab 8000 \
    --seq 256 --batch 2 --repeats 3 --warmup 1
step "done: outputs in $OUT/"

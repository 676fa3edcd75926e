#!/usr/bin/env bash
# OBELICS at full scale -> indexed binaries + image sidecars + image-tokenizer features.
# OBELICS is parquet (HF datasets layout data/train-XXXXX-of-NNNNN.parquet); its images are
# URLs, fetched beforehand (e.g. img2dataset) into IMAGES under sha1(url) file names.
#
# Same three steps as preprocess_mmc4.sh: "shards" per node (NODE_RANK of NUM_NODES takes
# every NUM_NODES-th parquet file), "merge" once, "features" on a GPU machine.
#
#   NODE_RANK=0 NUM_NODES=4 bash examples/preprocess_obelics.sh shards
#   NUM_NODES=4 bash examples/preprocess_obelics.sh merge
#   bash examples/preprocess_obelics.sh features
set -euo pipefail
cd "$(dirname "$0")/.."

OBELICS=${OBELICS:-/datasets/obelics/data}       # train-*.parquet
IMAGES=${IMAGES:-/datasets/obelics/images}       # sha1(url).<ext>
OUT=${OUT:-/datasets/vlgpt}
TOKENIZER=${TOKENIZER:-/models/llama-7b-hf/tokenizer.model}
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-/checkpoints/image_tokenizer}
NUM_FILES=${NUM_FILES:-1335}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORKERS=${WORKERS:-32}
PARTITIONS=${PARTITIONS:-8}
N=${N:-32}                                       # image tokens per image: the model's --num-image-tokens
STEP=${1:-all}

node_prefix() { echo "$OUT/parts/obelics_node$1"; }

if [ "$STEP" = shards ] || [ "$STEP" = all ]; then
    for node in $(if [ "$STEP" = all ]; then seq 0 $((NUM_NODES - 1)); else echo "$NODE_RANK"; fi); do
        mapfile -t files < <(seq "$node" "$NUM_NODES" $((NUM_FILES - 1)) |
                             awk -v n="$NUM_FILES" -v d="$OBELICS" '{printf "%s/train-%05d-of-%05d.parquet\n", d, $1, n}')
        echo "node $node: ${#files[@]} parquet files -> $(node_prefix "$node")"
        # --doc-sampling paper: one subsequence of <= 512 positions per document, <= 5 images chosen
        # at random with their sentences (the paper's rule; preprocess_mmc4.sh says more).
        python tools/preprocess_data.py --input-format obelics --input "${files[@]}" --image-root "$IMAGES" \
            --doc-sampling paper --max-images-per-doc 5 --subsequence-length 512 --num-image-tokens "$N" --seed 1234 \
            --tokenizer-type sentencepiece --tokenizer-model "$TOKENIZER" --prepend-bos --append-eod \
            --workers "$WORKERS" --partitions "$PARTITIONS" --no-progress \
            --output-prefix "$(node_prefix "$node")"
    done
fi

if [ "$STEP" = merge ] || [ "$STEP" = all ]; then
    parts=()
    for node in $(seq 0 $((NUM_NODES - 1))); do parts+=("$(node_prefix "$node")_text_document"); done
    python tools/merge_datasets.py --input "${parts[@]}" --output-prefix "$OUT/obelics_text_document"
fi

if [ "$STEP" = features ] || [ "$STEP" = all ]; then
    python tools/extract_image_features.py --image-tokenizer "$IMAGE_TOKENIZER" \
        --data-prefix "$OUT/obelics_text_document" --batch-size 256 --shard-size 65536
fi

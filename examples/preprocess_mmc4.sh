#!/usr/bin/env bash
# MMC4 at full scale -> indexed binaries + image sidecars + image-tokenizer features, the
# input of pretrain_vlgpt.py. MMC4 ships 23,099 shards docs_shard_{0..23098}_v2.jsonl.zip;
# the images are fetched separately (their file names are each record's image_name).
#
# Step "shards" runs on each of NUM_NODES machines (NODE_RANK = 0..NUM_NODES-1): node k takes
# shards k, k+NUM_NODES, ... and tokenizes them with WORKERS processes, in PARTITIONS
# resumable groups merged locally. Step "merge" (one machine, after all nodes) joins the node
# outputs; step "features" runs the frozen image tokenizer over every image (GPU).
#
#   NODE_RANK=3 bash examples/preprocess_mmc4.sh shards      # on each node
#   bash examples/preprocess_mmc4.sh merge
#   bash examples/preprocess_mmc4.sh features
#   bash examples/preprocess_mmc4.sh                          # all three, one machine
set -euo pipefail
cd "$(dirname "$0")/.."

MMC4=${MMC4:-/datasets/mmc4}                     # docs_shard_*_v2.jsonl.zip
IMAGES=${IMAGES:-$MMC4/images}                   # image files named by image_name
OUT=${OUT:-/datasets/vlgpt}
TOKENIZER=${TOKENIZER:-/models/llama-7b-hf/tokenizer.model}   # the LM's sentencepiece model
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-/checkpoints/image_tokenizer}   # train_tokenizer.py output
NUM_SHARDS=${NUM_SHARDS:-23099}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORKERS=${WORKERS:-32}                           # tokenizing processes per node
PARTITIONS=${PARTITIONS:-8}                      # groups per node (bounded memory, merged at the end)
N=${N:-32}                                       # image tokens per image: the model's --num-image-tokens
STEP=${1:-all}

node_prefix() { echo "$OUT/parts/mmc4_node$1"; }

if [ "$STEP" = shards ] || [ "$STEP" = all ]; then
    for node in $(if [ "$STEP" = all ]; then seq 0 $((NUM_NODES - 1)); else echo "$NODE_RANK"; fi); do
        mapfile -t shards < <(seq "$node" "$NUM_NODES" $((NUM_SHARDS - 1)) |
                              sed "s|.*|$MMC4/docs_shard_&_v2.jsonl.zip|")
        echo "node $node: ${#shards[@]} shards -> $(node_prefix "$node")"
        # --min-sim 0.24: drop images whose CLIP similarity to their matched sentence is low
        # (MMC4's own filtering threshold for the core subset). --doc-sampling paper: the paper's
        # sequences, one subsequence of <= 512 positions per document with <= 5 images chosen at
        # random with their sentences (N=32 image tokens, as the model); only those images are stored.
        python tools/preprocess_data.py --input-format mmc4 --input "${shards[@]}" \
            --image-root "$IMAGES" --min-sim 0.24 \
            --doc-sampling paper --max-images-per-doc 5 --subsequence-length 512 --num-image-tokens "$N" --seed 1234 \
            --tokenizer-type sentencepiece --tokenizer-model "$TOKENIZER" --prepend-bos --append-eod \
            --workers "$WORKERS" --partitions "$PARTITIONS" --no-progress \
            --output-prefix "$(node_prefix "$node")"
    done
fi

if [ "$STEP" = merge ] || [ "$STEP" = all ]; then
    parts=()
    for node in $(seq 0 $((NUM_NODES - 1))); do parts+=("$(node_prefix "$node")_text_document"); done
    python tools/merge_datasets.py --input "${parts[@]}" --output-prefix "$OUT/mmc4_text_document"
fi

if [ "$STEP" = features ] || [ "$STEP" = all ]; then
    # Resumable: finished shards of --shard-size images are kept if the job is restarted.
    python tools/extract_image_features.py --image-tokenizer "$IMAGE_TOKENIZER" \
        --data-prefix "$OUT/mmc4_text_document" --batch-size 256 --shard-size 65536
fi

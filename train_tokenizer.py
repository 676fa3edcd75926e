r"""Stage 1 of VL-GPT: train the image tokenizer (frozen CLIP + causal transformer -> N visual
embeddings) and detokenizer (-> the IP-Adapter-Plus image condition z_v and the SD 1.5 text
condition z_t) on image-text pairs from img2dataset webdataset shards, on the same DeepSpeed
engine, checkpoints and signals as pretrain_vlgpt.py. Every model comes from a local
directory; nothing is downloaded.

    # the paper's run, 8 GPUs (examples/train_tokenizer.sh has it in full)
    deepspeed --num_gpus 8 train_tokenizer.py \
        --clip-model models/clip-vit-large-patch14 --sd-model models/stable-diffusion-v1-5 \
        --ip-adapter models/IP-Adapter/models --ip-adapter-weight ip-adapter-plus_sd15.bin \
        --train-shards '0.4 cc3m/{00000..00331}.tar 0.3 laion-aes/{00000..09999}.tar 0.3 laion-coco/{00000..09999}.tar' \
        --visual-embed-dim 4096 --micro-batch-size 32 --global-batch-size 1024 --train-iters 10000 \
        --lr 2e-4 --lr-decay-style cosine --bf16 --zero-stage 2 --save ckpt/stage1 --save-interval 1000
    # tiny, on CPU with 2 processes (torchrun works the same way)
    deepspeed --num_gpus 2 train_tokenizer.py --clip-model tiny/clip --sd-model tiny/sd \
        --ip-adapter tiny/ip-adapter --ip-adapter-weight ip-adapter-plus_sd15.safetensors \
        --train-shards 'pairs/{00000..00003}.tar' --visual-embed-dim 64 --detokenizer-width 64 \
        --detokenizer-heads 4 --tokenizer-heads 2 --micro-batch-size 4 --train-iters 40 --save ckpt/stage1
    # precomputed targets: tools/precompute_tokenizer_targets.py once, then --targets-dir DIR
    # resume: the same command with --load ckpt/stage1; SIGTERM / SIGUSR1 saves and exits 0

Loss: λ1·MSE(z_v, e_v) + λ2·MSE(z_t, e_t) (--lambda-image, --lambda-text; either may be 0).
Export: tools/export_tokenizer.py --load ckpt/stage1 --save out -> out/image_tokenizer/
(for tools/extract_image_features.py --image-tokenizer) and out/image_detokenizer/ (for
tools/reconstruct_images.py and generation).
"""

import sys

from megatron_vl.stage1.trainer import parser, run


def build_parser():
    return parser(__doc__)


if __name__ == "__main__":
    sys.exit(run(description=__doc__))

r"""Stage 3 of VL-GPT: instruction tuning (VL-GPT-I) on conversation, caption and image-editing
data, the loss on the answers only (the assistant's tokens and end-of-turn, and the visual
embeddings of images it produces). Same engine, flags, checkpoints and signals as
pretrain_vlgpt.py; LoRA by default (--lora-rank 16, --lr 5e-5: the paper's recipe, override
any flag).

    # data: each instruction format -> indexed binaries with a loss mask, then image features
    python tools/preprocess_data.py --input-format llava --input llava.json --image-root llava/images \
        --conversation-template vicuna_v1 --output-prefix data/llava --tokenizer-model tokenizer.model --prepend-bos
    python tools/extract_image_features.py --data-prefix data/llava_text_document --image-tokenizer stage1/image_tokenizer
    # 4 GPUs, from a stage-2 training checkpoint (weights only; its LoRA merged, new adapters trained)
    deepspeed --num_gpus 4 finetune_instruct.py --load ckpt/vlgpt-stage2 --save ckpt/vlgpt-stage3 \
        --data-path 0.5 data/llava_text_document 0.2 data/coco-captions_text_document \
                    0.15 data/instructpix2pix_text_document 0.15 data/magicbrush_text_document \
        --model-preset vlgpt-7.5b \
        --global-batch-size 512 --train-iters 10000 --bf16 --zero-stage 2 --save-interval 1000
    # torchrun works the same; the same command again resumes from --save (its stage-3 checkpoint)
    # no --load is refused (stage 3 tunes a stage-2 checkpoint) unless --allow-random-init
    # export: tools/convert_checkpoint.py export-hf --load ckpt/vlgpt-stage3 --save vlgpt-i-hf

--no-pack puts one conversation per sample (padded); packed or not, no conversation attends
to another. Full recipe: examples/finetune_instruct.sh.
"""

import sys

from megatron_vl.training.finetune import DEFAULTS, STAGE, prepare
from megatron_vl.training.pretrain import parser, run


def build_parser():
    return parser(__doc__, STAGE)


if __name__ == "__main__":
    sys.exit(run(DEFAULTS + sys.argv[1:], __doc__, STAGE, prepare))

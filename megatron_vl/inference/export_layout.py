"""What a VL-GPT export directory holds (convert/vlgpt_export.py writes it, modeling_vlgpt.py
reads it)::

    OUT/config.json, model*.safetensors, tokenizer files   the LLaMA (transformers LlamaForCausalLM)
    OUT/adapter/                                            the peft LoRA adapter (unless merged)
    OUT/vlgpt_heads.safetensors                             visual projection and regression head
    OUT/vlgpt_config.json                                   format, image token ids, the parts below
    OUT/image_tokenizer/, OUT/image_detokenizer/            the stage-1 parts, when given
"""

from ..checkpoint.layout import IMAGE_DETOKENIZER_DIR, IMAGE_TOKENIZER_DIR  # noqa: F401  (the part folders, as in stage 1)

VLGPT_CONFIG = "vlgpt_config.json"


VLGPT_HEADS = "vlgpt_heads.safetensors"


ADAPTER_DIR = "adapter"


FORMAT_VERSION = 1


# our canonical name -> its name in vlgpt_heads.safetensors
HEADS = {"embedding.visual_proj.weight": "visual_proj.weight", "embedding.visual_proj.bias": "visual_proj.bias",
         "head.regression.weight": "regression.weight", "head.regression.bias": "regression.bias"}

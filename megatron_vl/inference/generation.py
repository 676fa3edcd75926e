"""Any-to-any generation from a VL-GPT export: prompts that mix text and images in, text and
images out, batched.

- Prompts: text where ``<image>`` marks each image (PIL images or files), tokenized by the
  export's tokenizer; each image becomes ``[IMG] v_0 .. v_{N-1} [/IMG]`` with v = the export's
  image tokenizer's embeddings (or given embeddings).
- Decoding, per sequence, as VL-GPT decodes: text by greedy / temperature / top-k / top-p
  sampling (sampling.py) until ``[IMG]``; then N embeddings, each the regression head's
  prediction fed back through the visual projection; then ``[/IMG]`` and text again. A
  text-to-image mode forces ``[IMG]`` after the prompt and stops after the image. The loop and
  its budgets are decode_loop.py's (shared with ``VLGPTForCausalLM.generate`` and the
  in-training evaluator): max_new_tokens counts text tokens only, an opened image is always
  completed, one that would not fit the position table is never opened, so every image
  returned is a whole ``[N, d]``.
- Batches: prompts of different lengths are left-padded (attention mask; positions count
  from each prompt's first real element), one KV cache (transformers' DynamicCache); stop at
  EOS, at a stop string, after max_new_tokens text tokens, or at the position table's end.
  Every tensor lives on the model's device and dtype; images come back on the CPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..data.instruct_formats import IMAGE_TAG
from .decode_loop import Generation, Prompt, check_positions, decode_loop
from .sampling import GenerationError, Sampling, check_text


def build_prompt(text: str, tokenize, image_embeds: Sequence[torch.Tensor], img_id: int, img_end_id: int,
                 bos_id: Optional[int] = None) -> Prompt:
    """Text with ``<image>`` tags + one [N, d] embedding block per tag -> a Prompt."""
    parts = text.split(IMAGE_TAG)
    if len(parts) - 1 != len(image_embeds):
        raise GenerationError(f"prompt has {len(parts) - 1} {IMAGE_TAG} tag(s) and {len(image_embeds)} image(s)")
    p = Prompt([bos_id] if bos_id is not None else [], [None] if bos_id is not None else [])
    for i, part in enumerate(parts):
        if part:
            ids = tokenize(part)
            p.tokens += ids
            p.visual += [None] * len(ids)
        if i < len(image_embeds):
            block = image_embeds[i]
            p.tokens += [img_id] + [0] * block.shape[0] + [img_end_id]
            p.visual += [None] + list(block) + [None]
    if not p.tokens:
        # Nothing to continue from: the model would be run on a 0-length sequence.
        raise GenerationError(f"prompt {text!r} is empty after tokenization (no text, no image, no BOS): give it "
                              "some text, or start it with the BOS token (--add-bos)")
    return p


def generate(model, prompts: Sequence[Prompt], sampling: Sampling, eos_id: Optional[int] = None,
             decode=None, pad_id: int = 0) -> List[Generation]:
    """Generates for every prompt in one batch on a VLGPTForCausalLM (its KV-cached step through
    the decode loop); `decode(ids) -> str` for stop strings and text. See the module docstring
    for the budgets: every image returned is a whole [N, d], on the CPU."""
    from .modeling_vlgpt import CachedStep
    out = decode_loop(CachedStep(model), prompts, sampling, eos_id, decode, pad_id)
    for g in out:
        g.images = [image.cpu() for image in g.images]
    return out


class Generator:
    """An export loaded for generation: its tokenizer, image tokenizer (prompt images) and,
    when it ships one, its image detokenizer (images out, through diffusers)."""

    def __init__(self, export_dir: str, device="cpu", dtype: Optional[torch.dtype] = None, add_bos: bool = True):
        import os
        from .modeling_vlgpt import VLGPTForCausalLM, load_tokenizer, read_export_config
        self.dir = export_dir
        read_export_config(export_dir)   # a missing or foreign directory: one line, before anything loads
        self.model = VLGPTForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(export_dir)
        self.add_bos = add_bos
        self.processor = None
        if self.model.image_tokenizer is not None:
            from ..model.image_tokenizer import load_image_processor
            self.processor = load_image_processor(os.path.join(export_dir, self.model.config["image_tokenizer"]))
        self.detokenizer_dir = os.path.join(export_dir, self.model.config["image_detokenizer"]) \
            if self.model.config.get("image_detokenizer") else None
        self._decoder = None

    @property
    def max_positions(self) -> int:
        return self.model.causal_lm.config.max_position_embeddings

    def encode(self, text: str) -> List[int]:
        """Text -> ids, special tokens' spellings kept as plain text: "[IMG]" typed by a user is
        not the image delimiter (an image comes only through <image> and its picture), nor is
        "</s>" the end of sequence."""
        check_text(text)
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text without special tokens: the one place generated answers become text, so
        an answer that ends at EOS carries no "</s>" into a results file or a score."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> List[torch.Tensor]:
        """PIL images -> [N, d] each, by the export's image tokenizer."""
        if not images:
            return []
        if self.model.image_tokenizer is None:
            raise GenerationError(f"{self.dir} ships no image tokenizer (export-hf --image-tokenizer): prompts cannot "
                             "hold images")
        tok = self.model.image_tokenizer
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        p = next(tok.parameters())
        return list(tok(pixels.to(p.device, p.dtype)).float())

    def prompt(self, text: str, images: Sequence = ()) -> Prompt:
        ids = self.model.image_token_ids
        bos = self.tokenizer.bos_token_id if self.add_bos else None
        check_text(text)
        p = build_prompt(text, self.encode, self.image_embeddings(images), ids["[IMG]"], ids["[/IMG]"], bos)
        check_positions(p, self.max_positions)
        return p

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> List[Generation]:
        return generate(self.model, prompts, sampling, self.tokenizer.eos_token_id, self.decode,
                        pad_id=self.tokenizer.pad_token_id or 0)

    def decoder(self, **kw):
        if self._decoder is None:
            if self.detokenizer_dir is None:
                raise GenerationError(f"{self.dir} ships no image detokenizer (export-hf --image-detokenizer): "
                                      "generated images cannot be turned into pixels")
            from ..model.image_detokenizer import ImageDetokenizer
            from .diffusion_decoder import DiffusionDecoder
            self._decoder = DiffusionDecoder(ImageDetokenizer.from_pretrained(self.detokenizer_dir),
                                             device=self.device, **kw)
        return self._decoder

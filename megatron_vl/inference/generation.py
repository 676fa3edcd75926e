"""Any-to-any generation from a VL-GPT export: prompts that mix text and images in, text and
images out, batched.

- Prompts: text where ``<image>`` marks each image (PIL images or files), tokenized by the
  export's tokenizer; each image becomes ``[IMG] v_0 .. v_{N-1} [/IMG]`` with v = the export's
  image tokenizer's embeddings (or given embeddings).
- Decoding, per sequence, as VL-GPT decodes: text by greedy / temperature / top-k / top-p
  sampling until ``[IMG]``; then N embeddings, each the regression head's prediction fed back
  through the visual projection; then ``[/IMG]`` and text again. A text-to-image mode forces
  ``[IMG]`` after the prompt and stops after the image.
- Budgets: max_new_tokens counts sampled text tokens (``[IMG]`` included) only. An image,
  once opened, is always completed (its N embeddings, then ``[/IMG]``), outside that budget;
  max_new_images (default: no limit) caps the images per sequence (then ``[IMG]`` is
  suppressed). An image that could not be completed within the model's position table
  (max_position_embeddings) is never opened: generation ends before its ``[IMG]``. So every
  image returned is a whole ``[N, d]``, and no partial image exists.
- Batches: prompts of different lengths are left-padded (attention mask; positions count
  from each prompt's first real element), one KV cache (transformers' DynamicCache); stop at
  EOS, at a stop string, after max_new_tokens text tokens, or at the position table's end.
  Every tensor lives on the model's device and dtype.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from ..data.instruct_formats import IMAGE_TAG
from ..errors import UsageError


class GenerationError(UsageError, ValueError):
    """A prompt or a generation setting that cannot work: one line from the tools (exit 2), a
    ValueError to Python callers."""


# The limits of each setting: (test, wording); the tools' flags and Sampling share them.
_LIMITS = {
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "0 (greedy) or more"),
    "top_k": (lambda v: v >= 0, "0 (off) or more"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)"),
}


_INTS = ("max_new_tokens", "top_k", "seed")


def _check(name: str, value) -> None:
    test, wording = _LIMITS[name]
    kinds = int if name in _INTS else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not test(value):
        raise GenerationError(f"{name} must be {wording}, got {value!r}")


def arg_type(kind, test, wording: str):
    """An argparse type: `kind` parsed, then refused unless test(value); argparse names the flag
    and exits 2 ("argument --top-p: must be in (0, 1] (1: off), got 2.0")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value
    return parse


def setting_type(name: str):
    """The argparse type of the Sampling field `name` (same limits as Sampling checks)."""
    test, wording = _LIMITS[name]
    return arg_type(int if name in _INTS else float, test, wording)


positive_int = arg_type(int, lambda v: v >= 1, "at least 1")


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    stop: Sequence[str] = ()
    seed: int = 0
    text_to_image: bool = False    # force [IMG] after the prompt; stop after the image
    text_only: bool = False        # never open an image ([IMG]/[/IMG] suppressed): answers, captions
    max_new_images: Optional[int] = None   # images per sequence at most (then [IMG] suppressed); None: no limit

    def __post_init__(self):
        # Refused here rather than sampled from: a negative temperature silently meant greedy,
        # top_p 2 silently meant off.
        for name in _LIMITS:
            _check(name, getattr(self, name))
        if isinstance(self.stop, str):
            raise GenerationError(f"stop must be a sequence of strings, got the string {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
            check_text(s, "stop string")
        if self.text_to_image and self.text_only:
            raise GenerationError("text_to_image and text_only cannot both be set (one forces an image, the other "
                                  "forbids images)")
        m = self.max_new_images
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise GenerationError(f"max_new_images must be None (no limit) or 0 or more, got {m!r}")
        if self.text_to_image and m == 0:
            raise GenerationError("text_to_image with max_new_images=0: the forced image would not be allowed")


def check_text(text: str, what: str = "prompt") -> None:
    """Refuses text that cannot be encoded as UTF-8: a command-line argument holding invalid
    UTF-8 bytes reaches Python as lone surrogates, which tokenizers reject with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        c = ord(text[exc.start])
        byte = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"code point U+{c:04X}"
        raise GenerationError(f"{what} is not valid UTF-8 text (undecodable {byte} at character {exc.start}): "
                              f"{text[:40]!r}") from None


@dataclass
class Prompt:
    tokens: List[int]
    visual: List[Optional[torch.Tensor]] = field(default_factory=list)   # per element: [d] or None


@dataclass
class Generation:
    text: str                      # the generated text (images as "<image>")
    tokens: List[int]              # generated elements (0 at visual positions)
    images: List[torch.Tensor]     # each image's [N, d], in order (always whole: see the module docstring)
    stopped_by: str                # "eos", "stop string", "max tokens", "image", "position limit"
    image_not_opened: bool = False   # stopped where an image ([IMG]) was due: it would not fit the position table


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


def check_positions(p: Prompt, max_positions: int, what: str = "prompt") -> None:
    """Refuses a prompt longer than the model's position table: past it the model was never
    trained (RoPE still computes, so it would silently generate garbage)."""
    if len(p.tokens) > max_positions:
        raise GenerationError(f"{what} has {len(p.tokens)} elements (text tokens and image positions), more than "
                              f"the model's {max_positions} positions (max_position_embeddings): shorten it")


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[b, vocab] -> [b] next tokens."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > s.top_p        # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def open_image_in_prompt(p: Prompt, img: int) -> int:
    """How many visual positions end `p` inside an image its last [IMG] opened (0 if none is
    open; -1 if the prompt ends with no [IMG] before its trailing visual positions)."""
    trailing = 0
    while trailing < len(p.visual) and p.visual[-1 - trailing] is not None:
        trailing += 1
    opened = trailing < len(p.tokens) and p.tokens[-1 - trailing] == img
    return trailing if opened else -1


@torch.no_grad()
def generate(model, prompts: Sequence[Prompt], sampling: Sampling, eos_id: Optional[int] = None,
             decode=None, pad_id: int = 0) -> List[Generation]:
    """Generates for every prompt in one batch; `decode(ids) -> str` for stop strings and text.
    See the module docstring for the budgets: every image returned is a whole [N, d]."""
    from transformers import DynamicCache
    from .modeling_vlgpt import cache_kwargs
    lm = model.causal_lm
    dev = model.regression.weight.device
    dtype = model.regression.weight.dtype
    img, img_end = model.image_token_ids["[IMG]"], model.image_token_ids["[/IMG]"]
    n_visual, d = model.config["num_image_tokens"], model.config["visual_embed_dim"]
    b = len(prompts)
    if b == 0:
        return []
    max_positions = getattr(lm.config, "max_position_embeddings", None) or float("inf")
    done: List[Optional[str]] = [None] * b
    not_opened = [False] * b
    for r, p in enumerate(prompts):
        if not p.tokens:
            raise GenerationError(f"prompt {r + 1} of {b} is empty: nothing to continue from")
        check_positions(p, max_positions, f"prompt {r + 1} of {b}")
        trailing = open_image_in_prompt(p, img)
        if 0 <= trailing <= n_visual and len(p.tokens) + (n_visual - trailing) + 1 > max_positions:
            raise GenerationError(f"prompt {r + 1} of {b} ends inside an image that cannot be completed within the "
                                  f"model's {max_positions} positions (max_position_embeddings): shorten it")
    if sampling.text_to_image:   # [IMG] forced where the whole image fits; else nothing is generated
        forced = []
        for r, p in enumerate(prompts):
            if len(p.tokens) + 1 + n_visual + 1 <= max_positions:
                forced.append(Prompt(p.tokens + [img], p.visual + [None]))
            else:
                forced.append(p)
                done[r], not_opened[r] = "position limit", True
        prompts = forced
    width = max(len(p.tokens) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
    vis = torch.zeros(b, width, d, device=dev, dtype=dtype)
    vmask = torch.zeros(b, width, dtype=torch.bool, device=dev)
    attn = torch.zeros(b, width, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        off = width - len(p.tokens)                      # left padding
        ids[r, off:] = torch.tensor(p.tokens, device=dev)
        attn[r, off:] = 1
        for j, v in enumerate(p.visual):
            if v is not None:
                vis[r, off + j] = v.to(dev, dtype)
                vmask[r, off + j] = True
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    hidden = lm.model(inputs_embeds=model.embed(ids, vis, vmask), attention_mask=attn, position_ids=positions,
                      use_cache=True, **cache_kwargs(lm.model, cache)).last_hidden_state[:, -1:]
    next_pos = positions[:, -1:] + 1
    # Per-row state: visual positions still to generate in the open image, whether [/IMG] is next,
    # the open image's embeddings so far (those the prompt holds first), text tokens and images made.
    remaining, close_next = [0] * b, [False] * b
    current: List[List[torch.Tensor]] = [[] for _ in range(b)]
    for r, p in enumerate(prompts):
        trailing = open_image_in_prompt(p, img) if not done[r] else -1
        if 0 <= trailing <= n_visual:   # (more than N visual positions after [IMG]: no image is open)
            remaining[r] = n_visual - trailing
            close_next[r] = remaining[r] == 0
            current[r] = [v.float().cpu() for v in p.visual[len(p.visual) - trailing:]]
    out_tokens: List[List[int]] = [[] for _ in range(b)]
    out_kinds: List[List[str]] = [[] for _ in range(b)]      # "text", "visual", "close" (a forced [/IMG])
    out_images: List[List[torch.Tensor]] = [[] for _ in range(b)]
    n_text, n_images = [0] * b, [0] * b
    generator = torch.Generator().manual_seed(sampling.seed)
    while True:
        for r in range(b):
            if done[r] or remaining[r] > 0 or close_next[r]:
                continue   # an open image is completed: it was only opened where it fits
            if int(next_pos[r, 0]) >= max_positions:     # the next element would sit beyond the table
                done[r] = "position limit"
            elif n_text[r] >= sampling.max_new_tokens:
                done[r] = "max tokens"
        if all(done):
            break
        logits = lm.lm_head(hidden)[:, -1]
        if sampling.text_only:
            logits[:, [img, img_end]] = float("-inf")
        elif sampling.max_new_images is not None:
            for r in range(b):
                if n_images[r] >= sampling.max_new_images:
                    logits[r, img] = float("-inf")
        picked = _pick(logits, sampling, generator)
        regressed = model.regression(hidden)[:, -1]                   # [b, d]
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        is_visual = torch.zeros(b, dtype=torch.bool, device=dev)
        for r in range(b):
            if done[r]:
                continue
            if remaining[r] > 0:
                is_visual[r] = True
                current[r].append(regressed[r].float().cpu())
                out_tokens[r].append(0)
                out_kinds[r].append("visual")
                remaining[r] -= 1
                close_next[r] = remaining[r] == 0
                continue
            if close_next[r]:
                token, close_next[r] = img_end, False
                out_images[r].append(torch.stack(current[r]))
                current[r] = []
                n_images[r] += 1
                out_kinds[r].append("close")
            else:
                token = int(picked[r])
                if token == img and int(next_pos[r, 0]) + n_visual + 1 >= max_positions:
                    # [IMG] here, its N embeddings and [/IMG] would not all fit: never opened.
                    done[r], not_opened[r] = "position limit", True
                    continue
                n_text[r] += 1
                if token == img:
                    remaining[r], close_next[r] = n_visual, n_visual == 0
                out_kinds[r].append("text")
            tokens[r] = token
            out_tokens[r].append(token)
            if out_kinds[r][-1] == "close" and sampling.text_to_image:
                done[r] = "image"
            elif out_kinds[r][-1] == "text" and eos_id is not None and token == eos_id:
                done[r] = "eos"
            elif out_kinds[r][-1] == "text" and sampling.stop and decode is not None:
                text = decode([t for t, k in zip(out_tokens[r], out_kinds[r])
                               if k == "text" and t not in (img, img_end)])
                if any(s in text for s in sampling.stop):
                    done[r] = "stop string"
        if all(done):
            break   # nothing more is fed to the model
        step = torch.where(is_visual[:, None, None], model.visual_proj(regressed[:, None].to(dtype)),
                           lm.get_input_embeddings()(tokens[:, None]))
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=dev)], 1)
        hidden = lm.model(inputs_embeds=step, attention_mask=attn, position_ids=next_pos, use_cache=True,
                          **cache_kwargs(lm.model, cache)).last_hidden_state
        next_pos = next_pos + 1
    results = []
    for r in range(b):
        text = ""
        if decode is not None:   # text runs decoded; each image as <image>
            pieces, run = [], []
            for tok, kind in zip(out_tokens[r], out_kinds[r]):
                if kind == "close":
                    if run:
                        pieces.append(decode(run))
                        run = []
                    pieces.append(IMAGE_TAG)
                elif kind == "text" and tok not in (img, img_end, eos_id):   # EOS is no part of the text
                    run.append(tok)
            if run:
                pieces.append(decode(run))
            text = "".join(pieces)
            for stop in sampling.stop:
                if stop in text:
                    text = text[:text.index(stop)]
        results.append(Generation(text, out_tokens[r], out_images[r], done[r], not_opened[r]))
    return results


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

"""The interleaved decode loop, once, for every model that generates text and images: the
export's ``generate`` (generation.py) and ``VLGPTForCausalLM.generate`` run it through a
KV-cached step (modeling_vlgpt.CachedStep), the in-training evaluator through the training
engine (eval/in_training.EngineStep).

Per sequence, as VL-GPT decodes: text tokens by the sampler until ``[IMG]``; then N visual
embeddings, each the regression head's prediction fed back as the next element; then
``[/IMG]`` and text again. The rules every caller gets:
- max_new_tokens counts sampled text tokens (``[IMG]`` included) only; an image, once opened
  (by the model or by a prompt that ends inside one), is always completed, outside that budget;
- max_new_images caps the images per sequence (``[IMG]`` suppressed after); text_only
  suppresses ``[IMG]`` and ``[/IMG]``; text_to_image forces ``[IMG]`` after the prompt and stops
  after that image;
- an image whose ``[IMG]``, N embeddings and ``[/IMG]`` would not all fit the position table is
  never opened: the sequence ends before its ``[IMG]``. So every image returned is a whole [N, d];
- a sequence also ends at EOS (a sampled text token), at a stop string, or at the table's end.
Prompts of different lengths are left-padded; positions count from each prompt's first real
element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from ..data.instruct_formats import IMAGE_TAG
from .sampling import GenerationError, Sampling, pick


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
    kinds: List[str] = field(default_factory=list)   # per generated element: "text", "visual", "close" ([/IMG])


class DecodeStep:
    """One model as the decode loop drives it. `forward` is called with the left-padded
    prompts first, then with one new element per sequence per step; `logits` and `regressed`
    read the outputs at the last element of the latest forward. A step keeps whatever it needs
    between calls (a KV cache, or the whole sequence to run again)."""

    def __init__(self, *, img: int, img_end: int, num_image_tokens: int, visual_dim: int, device, dtype,
                 max_positions: float = float("inf")):
        self.img = img                            # [IMG]
        self.img_end = img_end                    # [/IMG]
        self.num_image_tokens = num_image_tokens  # N embeddings per image
        self.visual_dim = visual_dim              # d
        self.device = device                      # where the loop puts the step's inputs
        self.dtype = dtype                        # the dtype of the visual embeddings it is given
        self.max_positions = max_positions        # the position table (inf: no limit is enforced)

    def forward(self, ids: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor,
                attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """The new elements ([b, k] ids, [b, k, d] visual embeddings taken where visual_mask is
        set; attention_mask [b, all elements so far], 0 at left padding; position_ids [b, k])."""
        raise NotImplementedError

    def logits(self) -> torch.Tensor:
        """[b, vocab]: the next token's logits (a fresh tensor: the loop masks it in place)."""
        raise NotImplementedError

    def regressed(self) -> torch.Tensor:
        """[b, d]: the regression head's prediction of the next visual embedding."""
        raise NotImplementedError

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        """The chosen tokens as every process continues with them (ranks decoding in lockstep
        take one rank's); one process: as they are."""
        return tokens


def check_positions(p: Prompt, max_positions: float, what: str = "prompt") -> None:
    """Refuses a prompt longer than the model's position table: past it the model was never
    trained (RoPE still computes, so it would silently generate garbage)."""
    if len(p.tokens) > max_positions:
        raise GenerationError(f"{what} has {len(p.tokens)} elements (text tokens and image positions), more than "
                              f"the model's {max_positions} positions (max_position_embeddings): shorten it")


def open_image(p: Prompt, img: int, num_image_tokens: int) -> Optional[int]:
    """How many visual positions of an image `p` ends inside (its last [IMG], then 0..N visual
    positions); None when no image is open (more than N visual positions after [IMG]: none is)."""
    trailing = 0
    while trailing < len(p.visual) and p.visual[-1 - trailing] is not None:
        trailing += 1
    opened = trailing < len(p.tokens) and p.tokens[-1 - trailing] == img and trailing <= num_image_tokens
    return trailing if opened else None


@dataclass
class _Row:
    """One sequence's state."""
    remaining: int = 0             # visual positions still to generate in the open image
    close_next: bool = False       # [/IMG] is the next element
    current: List[torch.Tensor] = field(default_factory=list)   # the open image's embeddings so far
    tokens: List[int] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)
    images: List[torch.Tensor] = field(default_factory=list)
    n_text: int = 0
    done: Optional[str] = None
    not_opened: bool = False

    def in_image(self) -> bool:
        return self.remaining > 0 or self.close_next


def _check_prompts(prompts: Sequence[Prompt], step: DecodeStep) -> None:
    b, n, limit = len(prompts), step.num_image_tokens, step.max_positions
    for r, p in enumerate(prompts):
        if not p.tokens:
            raise GenerationError(f"prompt {r + 1} of {b} is empty: nothing to continue from")
        check_positions(p, limit, f"prompt {r + 1} of {b}")
        trailing = open_image(p, step.img, n)
        if trailing is not None and len(p.tokens) + (n - trailing) + 1 > limit:
            raise GenerationError(f"prompt {r + 1} of {b} ends inside an image that cannot be completed within the "
                                  f"model's {limit} positions (max_position_embeddings): shorten it")


def left_padded(prompts: Sequence[Prompt], step: DecodeStep, pad_id: int):
    """The prompts as [b, width] ids / attention mask, [b, width, d] visual embeddings and mask,
    and [b, width] positions counted from each prompt's first real element: how every batch of
    prompts meets the model (the decode loop's first forward, eval/lmms's scoring forward)."""
    b, width, dev = len(prompts), max(len(p.tokens) for p in prompts), step.device
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
    vis = torch.zeros(b, width, step.visual_dim, device=dev, dtype=step.dtype)
    vmask = torch.zeros(b, width, dtype=torch.bool, device=dev)
    attn = torch.zeros(b, width, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        off = width - len(p.tokens)
        ids[r, off:] = torch.tensor(p.tokens, device=dev)
        attn[r, off:] = 1
        for j, v in enumerate(p.visual):
            if v is not None:
                vis[r, off + j] = v.to(dev, step.dtype)
                vmask[r, off + j] = True
    return ids, vis, vmask, attn, (attn.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def decode_loop(step: DecodeStep, prompts: Sequence[Prompt], sampling: Sampling, eos_id: Optional[int] = None,
                decode: Optional[Callable[[List[int]], str]] = None, pad_id: int = 0) -> List[Generation]:
    """Generates for every prompt in one batch (see the module docstring); `decode(ids) -> str`
    for stop strings and the text. Images are on step.device, float32."""
    if not prompts:
        return []
    _check_prompts(prompts, step)
    img, img_end, n_visual, limit = step.img, step.img_end, step.num_image_tokens, step.max_positions
    rows = [_Row() for _ in prompts]
    if sampling.text_to_image:   # [IMG] forced where the whole image fits; else nothing is generated
        forced = []
        for row, p in zip(rows, prompts):
            if len(p.tokens) + 1 + n_visual + 1 <= limit:
                forced.append(Prompt(p.tokens + [img], p.visual + [None]))
            else:
                forced.append(p)
                row.done, row.not_opened = "position limit", True
        prompts = forced
    for row, p in zip(rows, prompts):
        trailing = open_image(p, img, n_visual) if not row.done else None
        if trailing is not None:   # completed first: its given embeddings begin the image
            row.remaining = n_visual - trailing
            row.close_next = row.remaining == 0
            row.current = [v.float().to(step.device) for v in p.visual[len(p.visual) - trailing:]]
    ids, vis, vmask, attn, positions = left_padded(prompts, step, pad_id)
    step.forward(ids, vis, vmask, attn, positions)
    next_pos = positions[:, -1:] + 1
    b, dev = len(rows), step.device
    generator = torch.Generator().manual_seed(sampling.seed)
    while True:
        at = next_pos[:, 0].tolist()
        for row, pos in zip(rows, at):
            if row.done or row.in_image():
                continue   # an open image is completed: it was only opened where it fits
            if pos >= limit:                                   # the next element would sit beyond the table
                row.done = "position limit"
            elif row.n_text >= sampling.max_new_tokens:
                row.done = "max tokens"
        if all(row.done for row in rows):
            break
        logits = step.logits()
        if sampling.text_only:
            logits[:, [img, img_end]] = float("-inf")
        elif sampling.max_new_images is not None:
            for r, row in enumerate(rows):
                if len(row.images) >= sampling.max_new_images:
                    logits[r, img] = float("-inf")
        # Drawn every step for every row, so a seed gives the same tokens whatever the batch does.
        picked = step.share(pick(logits, sampling, generator)).tolist()
        regressed = step.regressed() if any(not row.done and row.remaining > 0 for row in rows) else None
        tokens, is_visual = [0] * b, [False] * b
        for r, (row, pos) in enumerate(zip(rows, at)):
            if row.done:
                continue
            if row.remaining > 0:
                is_visual[r] = True
                row.current.append(regressed[r].float())
                row.tokens.append(0)
                row.kinds.append("visual")
                row.remaining -= 1
                row.close_next = row.remaining == 0
                continue
            if row.close_next:
                token, row.close_next = img_end, False
                row.images.append(torch.stack(row.current))
                row.current = []
                row.kinds.append("close")
            else:
                token = int(picked[r])
                if token == img and pos + n_visual + 1 >= limit:
                    # [IMG] here, its N embeddings and [/IMG] would not all fit: never opened.
                    row.done, row.not_opened = "position limit", True
                    continue
                row.n_text += 1
                if token == img:
                    row.remaining, row.close_next = n_visual, n_visual == 0
                row.kinds.append("text")
            tokens[r] = token
            row.tokens.append(token)
            if row.kinds[-1] == "close" and sampling.text_to_image:
                row.done = "image"
            elif row.kinds[-1] == "text" and eos_id is not None and token == eos_id:
                row.done = "eos"
            elif row.kinds[-1] == "text" and sampling.stop and decode is not None:
                if any(s in decode(_text_tokens(row, img, img_end)) for s in sampling.stop):
                    row.done = "stop string"
        if all(row.done for row in rows):
            break   # nothing more is fed to the model
        visual = regressed[:, None] if regressed is not None else \
            torch.zeros(b, 1, step.visual_dim, device=dev, dtype=step.dtype)
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=dev)], 1)
        step.forward(torch.tensor(tokens, device=dev)[:, None], visual, torch.tensor(is_visual, device=dev)[:, None],
                     attn, next_pos)
        next_pos = next_pos + 1
    return [Generation(_text(row, decode, sampling.stop, img, img_end, eos_id), row.tokens, row.images, row.done,
                       row.not_opened, row.kinds) for row in rows]


def _text_tokens(row: _Row, img: int, img_end: int) -> List[int]:
    return [t for t, k in zip(row.tokens, row.kinds) if k == "text" and t not in (img, img_end)]


def _text(row: _Row, decode, stop: Sequence[str], img: int, img_end: int, eos_id: Optional[int]) -> str:
    """The generated text: its runs decoded, each image as <image>, cut at the first stop string."""
    if decode is None:
        return ""
    pieces, run = [], []
    for tok, kind in zip(row.tokens, row.kinds):
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
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text

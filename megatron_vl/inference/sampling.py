"""How the next text token is chosen: the generation settings (Sampling), their limits, and the
sampler (greedy / temperature / top-k / top-p) the decode loop calls at every step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UsageError


class GenerationError(UsageError, ValueError):
    """A prompt or a generation setting that cannot work: one line from the tools (exit 2), a
    ValueError to Python callers."""


# The limits of each setting: name -> (kind, test, wording). Sampling checks them, and
# tools/generate.py builds its flags' argparse types from them, so both refuse the same values.
LIMITS = {
    "max_new_tokens": (int, lambda v: v >= 1, "at least 1"),
    "temperature": (float, lambda v: math.isfinite(v) and v >= 0, "0 (greedy) or more"),
    "top_k": (int, lambda v: v >= 0, "0 (off) or more"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    "seed": (int, lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)"),
}


def _check(name: str, value) -> None:
    kind, test, wording = LIMITS[name]
    kinds = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not test(value):
        raise GenerationError(f"{name} must be {wording}, got {value!r}")


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
        for name in LIMITS:
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


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[b, vocab] -> [b] next tokens. Sampling draws for every row at once from `generator`
    (on the CPU), so a seed gives the same tokens on any device."""
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

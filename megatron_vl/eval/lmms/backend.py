"""What the lmms-eval model class (model.py) runs on: the Backend contract, and ExportBackend,
our HF export through inference.generation.Generator (batched, left-padded, KV-cached).

The training-time backend (training.py's EngineBackend) implements the same contract over the
live engine, so model.py never knows which one it drives.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from ...errors import UsageError
from ...inference.decode_loop import Generation, Prompt
from ...inference.sampling import GenerationError, Sampling

__all__ = ["Backend", "ExportBackend", "default_device", "parse_dtype"]


class Backend:
    """A VL-GPT model as model.py uses it. Every method is called on every process that runs
    the lmms-eval model (each data-parallel rank runs its own share of the requests)."""

    device: torch.device
    """Where the model's tensors live (lmms-eval's torchrun path gathers request counts there)."""
    can_generate_images: bool = False
    """True when image_decoder() can turn generated visual embeddings into pictures."""
    max_positions: float = float("inf")
    """The model's position table: no prompt scored or generated from may be longer."""

    def prompt(self, text: str, images: Sequence) -> Prompt:
        """`text` holding exactly one ``<image>`` per image (PIL images), in order -> a Prompt:
        BOS first as the backend's generator adds it, the text parts tokenized, each image as
        ``[IMG] v_0 .. v_{N-1} [/IMG]`` from the backend's image tokenizer. GenerationError (one
        line) when it cannot be built (tag/image count, too long for the position table)."""
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        """Text -> ids, no special tokens added (a special token's spelling is plain text)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens skipped."""
        raise NotImplementedError

    def generate(self, prompts: List[Prompt], sampling: Sampling) -> List[Generation]:
        """One Generation per prompt, as inference.generation.generate returns them."""
        raise NotImplementedError

    def score(self, prompts: List[Prompt], n_continuation: List[int]) -> List[Tuple[float, bool]]:
        """Per prompt: (the float64 sum of the float32 log-probabilities of its last n tokens,
        each given everything before it; True when each of those tokens is the argmax at its
        position). The last n elements must be text tokens (GenerationError otherwise)."""
        raise NotImplementedError

    def image_decoder(self):
        """The diffusion decoder of generated images (inference.diffusion_decoder.DiffusionDecoder)."""
        raise GenerationError(f"{type(self).__name__} cannot turn generated images into pictures")


def default_device() -> str:
    """cuda:LOCAL_RANK when CUDA is there (one GPU per torchrun / accelerate rank), else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value) -> Optional[torch.dtype]:
    """model_args dtype: None/"auto" (the export's own), float32, bfloat16, float16, or a torch.dtype."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value if isinstance(value, torch.dtype) else None
    if value not in DTYPES:
        raise UsageError(f"model_args dtype={value}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[value]


def check_continuations(prompts: Sequence[Prompt], n_continuation: Sequence[int]) -> None:
    """Refuses what score() cannot answer: a count outside 1..len-1, a visual position inside it."""
    if len(prompts) != len(n_continuation):
        raise GenerationError(f"score: {len(prompts)} prompts but {len(n_continuation)} continuation lengths")
    for r, (p, n) in enumerate(zip(prompts, n_continuation)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < len(p.tokens):
            raise GenerationError(f"score: prompt {r + 1} has {len(p.tokens)} elements; its continuation length "
                                  f"{n!r} must be in 1..{len(p.tokens) - 1} (the first element has no prediction)")
        if any(v is not None for v in p.visual[len(p.tokens) - n:]):
            raise GenerationError(f"score: prompt {r + 1}'s last {n} elements hold an image position: "
                                  "only text tokens are scored")


def score_rows(log_probs: torch.Tensor, targets: torch.Tensor) -> Tuple[float, bool]:
    """[n, vocab] float32 log-probabilities and the [n] tokens they predict -> (float64 sum of
    the tokens' log-probabilities, every token the argmax)."""
    picked = log_probs.gather(-1, targets[:, None])[:, 0]
    return float(picked.double().sum()), bool((log_probs.argmax(-1) == targets).all())


class ExportBackend(Backend):
    """A VL-GPT export (tools/convert_checkpoint.py export-hf) through our Generator.

    `image_tokenizer`: an image tokenizer directory (ImageTokenizer.save_pretrained, its CLIP
    image processor beside it) used instead of the export's own (for an export made without
    --image-tokenizer). `device`: None = default_device(). `dtype`: see parse_dtype."""

    def __init__(self, pretrained: str, image_tokenizer: Optional[str] = None, device=None, dtype=None,
                 add_bos: bool = True):
        from ...inference.generation import Generator
        from ...inference.modeling_vlgpt import check_model_dir
        if not os.path.isdir(str(pretrained)):
            raise UsageError(f"model_args pretrained={pretrained}: no such directory (a tools/convert_checkpoint.py "
                             "export-hf output)")
        check_model_dir(str(pretrained), "model_args pretrained")
        if image_tokenizer is not None and not os.path.isdir(str(image_tokenizer)):
            raise UsageError(f"model_args image_tokenizer={image_tokenizer}: no such directory")
        self.gen = Generator(str(pretrained), device or default_device(), parse_dtype(dtype), add_bos=add_bos)
        self.device = self.gen.device
        if image_tokenizer is not None:
            from ...model.image_tokenizer import ImageTokenizer, load_image_processor
            p = next(self.gen.model.parameters())
            self.gen.model.image_tokenizer = ImageTokenizer.from_pretrained(str(image_tokenizer)).to(p.device).eval()
            self.gen.processor = load_image_processor(str(image_tokenizer))
        self.can_generate_images = self.gen.detokenizer_dir is not None
        self.max_positions = self.gen.max_positions

    def prompt(self, text: str, images: Sequence) -> Prompt:
        return self.gen.prompt(text, images)

    def encode(self, text: str) -> List[int]:
        return self.gen.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.gen.decode(ids)

    def generate(self, prompts: List[Prompt], sampling: Sampling) -> List[Generation]:
        return self.gen.generate(prompts, sampling)

    @torch.no_grad()
    def score(self, prompts: List[Prompt], n_continuation: List[int]) -> List[Tuple[float, bool]]:
        """One left-padded forward of the whole batch (the decode loop's padding and position
        rules); the vocabulary projection only where a continuation token is predicted."""
        from ...inference.decode_loop import left_padded
        from ...inference.modeling_vlgpt import CachedStep
        if not prompts:
            return []
        check_continuations(prompts, n_continuation)
        model = self.gen.model
        pad_id = self.gen.tokenizer.pad_token_id or 0   # as Generator.generate pads
        ids, vis, vmask, attn, positions = left_padded(prompts, CachedStep(model), pad_id)
        lm = model.causal_lm
        hidden = lm.model(inputs_embeds=model.embed(ids, vis, vmask), attention_mask=attn,
                          position_ids=positions).last_hidden_state
        width, out = ids.shape[1], []
        for r, n in enumerate(n_continuation):
            # Element j is predicted from the hidden state at j - 1; the last n sit at width-n .. width-1.
            logits = lm.lm_head(hidden[r, width - n - 1:width - 1]).float()
            out.append(score_rows(torch.log_softmax(logits, -1), ids[r, width - n:]))
        return out

    def image_decoder(self):
        return self.gen.decoder()

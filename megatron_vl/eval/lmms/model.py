"""VLGPTLmms: VL-GPT as lmms-eval 0.7.3 sees it (``--model vlgpt``), over a Backend (backend.py).

Requests (lmms-eval hands over every request of one type in one call):
- generate_until: grouped by their gen_kwargs and batched (lmms-eval's Collator, longest
  prompt first), one Backend.generate per batch. gen_kwargs: until -> stop strings,
  max_new_tokens (default 256), greedy when do_sample is false or the temperature 0 or missing
  (else temperature / top_p / top_k sampling; see sampling_from_gen_kwargs), num_beams > 1 refused; other keys are ignored (tasks
  carry other models' settings). The answer is the generated text, stripped; text only, unless
  model_args image_outputs=DIR: then the model may open images (text_to_image=true: must open one
  right after the prompt, and stops after it: text-to-image tasks), each is drawn by the export's
  image detokenizer into DIR and the answer is lmms-eval's ``{"text": ..., "images": [paths]}``.
- loglikelihood (and multiple_choice, one request per choice): (mean NLL of the continuation's
  tokens, every continuation token the greedy one), as lmms-eval's own wrappers return it
  (multiple_choice takes the argmin). The continuation's tokens are those the context +
  continuation text has beyond the context's (a word split across the boundary is tokenized
  as one text), else the context's followed by the continuation encoded alone.
- Images (doc_to_visual, PIL): a prompt with no ``<image>`` tag gets one per image in front
  (VL-GPT's prompts are ``<image>Question: ...``); a prompt with tags needs one per image.
- generate_until_multi_round and video/audio inputs: refused with one line.

Data parallel is lmms-eval's: it sets rank / world_size on the model and shards the requests;
the model only reports its device (cuda:LOCAL_RANK under torchrun / accelerate) and never
touches torch.distributed itself. clean() keeps the model: lmms-eval's deletes every nn.Module
attribute after each run, and in training the model must survive it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator

from ...data.instruct_formats import IMAGE_TAG
from ...errors import UsageError
from ...inference.decode_loop import Generation, Prompt, check_positions
from ...inference.sampling import GenerationError, Sampling
from .backend import Backend

__all__ = ["VLGPTLmms", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 256
"""generate_until's answer length when a task's gen_kwargs name none."""

MODEL_ARGS = ("pretrained", "image_tokenizer", "device", "batch_size", "dtype", "image_outputs", "text_to_image",
              "diffusion_steps",
              "guidance_scale", "image_size")


class VLGPTLmms(lmms):
    """``--model vlgpt``. From the CLI: ``pretrained`` (an export-hf directory; an ExportBackend
    is built), ``image_tokenizer`` (a directory used instead of the export's), ``device``
    (default cuda:LOCAL_RANK, else cpu), ``batch_size`` (both also from --device / --batch_size;
    model_args win), ``dtype`` (auto, float32, bfloat16,
    float16), ``image_outputs`` (a directory: answers may hold images, drawn with
    ``diffusion_steps`` / ``guidance_scale`` / ``image_size``). In training: ``backend`` (any
    Backend) and ``batch_size`` only."""

    def __init__(self, pretrained: Optional[str] = None, image_tokenizer: Optional[str] = None, device=None,
                 batch_size=1, dtype=None, image_outputs: Optional[str] = None, diffusion_steps: int = 50,
                 guidance_scale: float = 7.5, image_size: Optional[int] = None, backend: Optional[Backend] = None,
                 max_batch_size=None, text_to_image: bool = False, **unknown):
        super().__init__()
        if unknown:   # a typo must not silently fall back to a default
            raise UsageError(f"model_args {', '.join(sorted(unknown))}: unknown to the vlgpt model; it takes "
                             f"{', '.join(MODEL_ARGS)}")
        self._batch_size = _whole_number("batch_size", batch_size)
        if backend is None:
            if pretrained is None:
                raise UsageError("model_args pretrained=<export dir> is required (a tools/convert_checkpoint.py "
                                 "export-hf output)")
            from .backend import ExportBackend
            backend = ExportBackend(pretrained, image_tokenizer, device, dtype)
        elif any(v is not None for v in (pretrained, image_tokenizer, device, dtype)):
            raise UsageError("VLGPTLmms: give either a backend or pretrained/image_tokenizer/device/dtype, not both")
        self.backend = backend
        self.image_outputs = str(image_outputs) if image_outputs is not None else None
        if self.image_outputs is not None and not backend.can_generate_images:
            raise UsageError(f"model_args image_outputs={image_outputs}: this model cannot draw images (an export "
                             "needs an image detokenizer: export-hf --image-detokenizer)")
        if not isinstance(text_to_image, bool):
            raise UsageError(f"model_args text_to_image={text_to_image}: expected true or false")
        if text_to_image and self.image_outputs is None:
            raise UsageError("model_args text_to_image=true needs image_outputs=DIR (where the images go)")
        self.text_to_image = text_to_image
        self.diffusion_steps = _whole_number("diffusion_steps", diffusion_steps)
        self.guidance_scale = float(guidance_scale)
        self.image_size = None if image_size is None else _whole_number("image_size", image_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """--model_args over the CLI's --batch_size / --device: lmms-eval always passes
        --batch_size (default 1), and its own merge would give batch_size twice (a TypeError)
        when model_args names it too."""
        from lmms_eval import utils
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(utils.simple_parse_args_string(arg_string))
        return cls(**args)

    # --- what lmms-eval's evaluator reads ---------------------------------------------------

    @property
    def device(self):
        return self.backend.device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def chat_template(self):
        """lmms-eval reads it only under --apply_chat_template."""
        raise UsageError("--apply_chat_template: the vlgpt model has no chat template (VL-GPT prompts are plain text); "
                         "run without it")

    apply_chat_template = chat_template

    def clean(self):
        """Nothing: the model outlives the run (lmms-eval's deletes every nn.Module attribute)."""

    # --- requests -----------------------------------------------------------------------------

    def generate_until(self, requests) -> List:
        if not requests:
            return []
        # Grouped by gen_kwargs (one Sampling per batch), longest prompt first.
        collator = Collator([r.args for r in requests], lambda a: -len(a[0]), group_fn=lambda a: a[1], grouping=True)
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            where = _where(chunk[0])
            sampling = self._sampling(chunk[0][1], where)
            prompts = [self._prompt(args[0], self._visuals(args), _where(args)) for args in chunk]
            for args, p, out in zip(chunk, prompts, self.backend.generate(prompts, sampling)):
                answers.append(GenerationResult(self._answer(out, args),
                                                TokenCounts(input_tokens=len(p.tokens), output_tokens=len(out.tokens))))
        return collator.get_original(answers)

    def loglikelihood(self, requests) -> List:
        if not requests:
            return []
        # Longest (in characters) first: a batch pads little.
        collator = Collator([r.args for r in requests],
                            lambda a: -len(a[0]) - (len(a[1]) if isinstance(a[1], str) else 0))
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            # A context (its images embedded) is built once per batch: the choices of one
            # multiple_choice document, of like lengths, mostly share a batch; kept no longer,
            # so memory stays one batch's whatever the task's size.
            contexts: Dict[tuple, tuple] = {}
            built = [self._scored_prompt(args, contexts) for args in chunk]
            rows = [k for k, (_, n) in enumerate(built) if n > 0]
            scores = self.backend.score([built[k][0] for k in rows], [built[k][1] for k in rows])
            out = [(0.0, True)] * len(built)   # an empty continuation: nothing to predict
            for k, (total, greedy) in zip(rows, scores):
                out[k] = (-total / built[k][1], greedy)
            # GenerationResult keeps the pair a pair: lmms-eval 0.7.3 turns any other output into
            # its str() (api/instance.py:71), which multiple_choice cannot unpack.
            results += [GenerationResult(text=pair) for pair in out]
        return collator.get_original(results)

    def generate_until_multi_round(self, requests):
        raise UsageError("the vlgpt model does not run generate_until_multi_round tasks (multi-round chat): use "
                         "generate_until, loglikelihood or multiple_choice tasks")

    # --- pieces ----------------------------------------------------------------------------

    def _visuals(self, args) -> list:
        if len(args) < 6:   # acc_mutual_info's unconditional request: (context, continuation)
            return []
        doc_to_visual, doc_id, task, split = args[2], args[-3], args[-2], args[-1]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        flat = []
        for v in visuals or []:
            flat += v if isinstance(v, (list, tuple)) else [v]
        from PIL import Image
        for k, v in enumerate(flat):
            if not isinstance(v, Image.Image):
                raise UsageError(f"{_where(args)}: visual {k} is a {type(v).__name__}; the vlgpt model takes "
                                 "images (PIL) only, not video or audio")
        return [v if v.mode == "RGB" else v.convert("RGB") for v in flat]

    def _prompt(self, text: str, images: Sequence, where: str) -> Prompt:
        try:
            return self.backend.prompt(with_image_tags(text, len(images), where), images)
        except GenerationError as exc:
            raise GenerationError(f"{where}: {exc}") from None

    def _scored_prompt(self, args, contexts: Dict) -> Tuple[Prompt, int]:
        """(the whole prompt, how many of its last tokens are the continuation). `contexts`
        holds the context prompts already built (images embedded), by document and context."""
        context, continuation = args[0], args[1]
        if callable(continuation):   # output_type loglikelihood passes doc_to_target
            continuation = continuation(self.task_dict[args[-2]][args[-1]][args[-3]])
        where = _where(args)
        if not isinstance(continuation, str):
            raise UsageError(f"{where}: the continuation is a {type(continuation).__name__}, not text "
                             "(doc_to_target must give a string)")
        if IMAGE_TAG in continuation:
            raise UsageError(f"{where}: the continuation holds {IMAGE_TAG}; only text is scored")
        key = (args[-3:] if len(args) >= 6 else None, context)
        if key not in contexts:
            images = self._visuals(args)
            context = with_image_tags(context, len(images), where)
            last = context.split(IMAGE_TAG)[-1]   # the text after the last image: a prompt's tokens end with it
            contexts[key] = (self._prompt(context, images, where), last, self.backend.encode(last) if last else [])
        ctx, last, last_ids = contexts[key]
        # The context's last text and the continuation tokenized as one text (what the whole
        # prompt would hold: a word split across the boundary is one word) when that keeps the
        # context's own tokens in front; else the continuation encoded alone.
        joint = self.backend.encode(last + continuation)
        extra = joint[len(last_ids):] if joint[:len(last_ids)] == last_ids else self.backend.encode(continuation)
        p = Prompt(ctx.tokens + extra, ctx.visual + [None] * len(extra))
        try:
            check_positions(p, self.backend.max_positions, "the context with its continuation")
        except GenerationError as exc:
            raise GenerationError(f"{where}: {exc}") from None
        return p, len(extra)

    def _sampling(self, gen_kwargs, where: str) -> Sampling:
        return sampling_from_gen_kwargs(gen_kwargs, where, text_only=self.image_outputs is None,
                                        text_to_image=self.text_to_image)

    def _answer(self, out: Generation, args) -> str:
        if self.image_outputs is None:
            return out.text.strip()
        paths = []
        if out.images:
            import torch
            os.makedirs(self.image_outputs, exist_ok=True)
            doc_id, stem = args[-3], re.sub(r"[^\w.-]", "_", f"{args[-2]}_{args[-3]}")
            seed = doc_id if isinstance(doc_id, int) else 0   # one picture per doc, whatever the batch
            pictures = self.backend.image_decoder().decode(
                torch.stack(out.images), "both", self.image_size, self.image_size, self.diffusion_steps,
                self.guidance_scale, [seed + k for k in range(len(out.images))])
            for k, picture in enumerate(pictures):
                paths.append(os.path.abspath(os.path.join(self.image_outputs, f"{stem}_{k}.png")))
                picture.save(paths[-1])
        return json.dumps({"text": out.text.replace(IMAGE_TAG, "").strip(), "images": paths})


def sampling_from_gen_kwargs(gen_kwargs, where: str, text_only: bool = True, text_to_image: bool = False) -> Sampling:
    """An lmms-eval task's generation_kwargs as our Sampling (one line naming `where` and the
    setting when the model cannot run them). Also the pre-run check of --eval-harness lmms."""
    g = dict(gen_kwargs or {})
    beams = g.get("num_beams") or 1
    if beams != 1:
        raise UsageError(f"{where}: gen_kwargs num_beams={beams}: the vlgpt model has no beam search (greedy or "
                         "sampling only); use num_beams=1")
    until = g.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    # As lmms-eval's own wrappers read them (llava: sampling when temperature > 0), do_sample:
    # false forcing greedy; do_sample: true without a temperature samples at 1 (transformers'
    # default). Greedy ignores temperature, top_p and top_k (pope, mathverse, mmsearch set
    # top_p: 0 beside do_sample: false).
    temperature = g.get("temperature")
    do_sample = g.get("do_sample")
    greedy = do_sample is False or (do_sample is None and not temperature) or temperature == 0
    try:
        if greedy:
            return Sampling(max_new_tokens=int(g.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                            stop=tuple(s for s in until if s), text_only=text_only, text_to_image=text_to_image)
        return Sampling(max_new_tokens=int(g.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                        temperature=1.0 if temperature is None else float(temperature),
                        top_k=int(g.get("top_k") or 0), top_p=1.0 if g.get("top_p") is None else float(g["top_p"]),
                        stop=tuple(s for s in until if s), text_only=text_only, text_to_image=text_to_image)
    except GenerationError as exc:
        raise GenerationError(f"{where}: gen_kwargs {exc}") from None


def with_image_tags(context: str, n_images: int, where: str) -> str:
    """`context` with one ``<image>`` per image: put in front when it has none; else it must have
    exactly one per image."""
    tags = context.count(IMAGE_TAG)
    if tags == 0:
        return IMAGE_TAG * n_images + context
    if tags != n_images:
        raise UsageError(f"{where}: the prompt has {tags} {IMAGE_TAG} tag(s) for {n_images} image(s) from "
                         f"doc_to_visual; give one tag per image, in order, or none (then they go in front)")
    return context


def _where(args) -> str:
    """'task T doc D' for an lmms-eval request's arguments."""
    if len(args) >= 6:
        return f"task {args[-2]} doc {args[-3]}"
    return "an unconditional (acc_mutual_info) request"


def _whole_number(name: str, value) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise UsageError(f"model_args {name}={value}: expected a whole number, 1 or more"
                         + (" (auto is not supported)" if name == "batch_size" else ""))
    return int(text)


def _skip_filelock_patch_without_filelock_api() -> None:
    """lmms-eval 0.7.3's simple_evaluate patches filelock._api (evaluator.py:115-166), which
    filelock 4 lacks; the lmms extra pins filelock<4, and this keeps a later filelock 4 working
    (the patch is only a re-entrancy nicety of its own)."""
    if importlib.util.find_spec("filelock") and not importlib.util.find_spec("filelock._api"):
        from lmms_eval import evaluator
        evaluator._enable_reentrant_filelocks._patched = True


_skip_filelock_patch_without_filelock_api()

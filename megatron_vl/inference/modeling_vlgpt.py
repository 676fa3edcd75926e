"""VL-GPT for inference on transformers: an exported directory (tools/convert_checkpoint.py
export-hf) loaded back with its visual ends.

    from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
    model = VLGPTForCausalLM.from_pretrained("vlgpt-hf")          # LoRA adapter applied by peft
    out = model(input_ids, visual_embeds=feats, visual_mask=mask)  # out.logits, out.visual_predictions
    gen = model.generate(input_ids, max_new_tokens=64)            # interleaved: gen.tokens, gen.images ([N, d] each)

The language model is a plain ``LlamaForCausalLM`` (``model.language_model``; a
``PeftModel`` around it when the directory holds an unmerged adapter), so text generation
is transformers' own ``generate``. Visual positions (``visual_mask``) take the visual
projection of their image-tokenizer embedding instead of a token embedding; the regression
head maps the final hidden states to predicted visual embeddings — as in training, the
output at t predicts element t+1.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import NamedTuple, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from .decode_loop import DecodeStep, Prompt, decode_loop, open_image
from .export_layout import ADAPTER_DIR, VLGPT_CONFIG, VLGPT_HEADS
from .sampling import Sampling
from ..errors import InputError


class ExportDirError(InputError, FileNotFoundError):
    """A --hf-dir that is missing, not a model directory, or damaged. Also a FileNotFoundError,
    so callers that report a missing directory keep doing so."""

    def __str__(self) -> str:   # FileNotFoundError would print "(errno) msg" given two args
        return str(self.args[0]) if self.args else ""


def check_model_dir(path: str, what: str = "--hf-dir") -> None:
    """Refuses anything but an existing local directory holding a transformers config.json,
    before any from_pretrained sees it: transformers would take a missing path for a Hub repo id
    (and try to download it, or fail with "Repo id must be in the form ...")."""
    if not path or not os.path.exists(path):
        raise ExportDirError(f"{what} {path}: no such directory")
    if not os.path.isdir(path):
        raise ExportDirError(f"{what} {path}: not a directory (an export-hf output or a LLaMA directory)")
    if os.path.isfile(os.path.join(path, "latest")) or os.path.isfile(os.path.join(path, "megatron_vl_checkpoint.json")):
        raise ExportDirError(f"{what} {path}: a training or release checkpoint, not a VL-GPT export: export it first "
                             f"(python tools/convert_checkpoint.py export-hf --load {path} --save DIR)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ExportDirError(f"{what} {path}: no config.json: not a transformers model directory (an export-hf "
                             "output or a LLaMA directory)")


def _load(what: str, path: str, loader, **kwargs):
    """loader(path, local_files_only=True, **kwargs), its failures (a truncated weights file,
    a damaged tokenizer) as one line naming the directory. Nothing is ever downloaded."""
    try:
        return loader(path, local_files_only=True, **kwargs)
    except Exception as exc:   # noqa: BLE001 - safetensors' SafetensorError is a bare Exception; OSError, ...
        msg = " ".join(str(exc).split())
        raise ExportDirError(f"{path}: cannot load the {what} ({type(exc).__name__}: {msg[:300]})") from None


def load_tokenizer(path: str):
    """The export's transformers tokenizer, read from `path` only."""
    from transformers import AutoTokenizer
    check_model_dir(path)
    tok = _load("tokenizer", path, AutoTokenizer.from_pretrained)
    # transformers 5 rebuilds a LLaMA tokenizer as BPE with byte fallback and no unknown token:
    # a sentencepiece model without byte pieces then drops the characters it lacks, where
    # sentencepiece (what tokenized the training data) gives <unk>. Not carried over: a
    # sentencepiece model's own normalisation rules (nmt_nfkc, remove_extra_whitespaces, as the
    # tests' tiny model has; LLaMA's is the identity), so with such a model "\n" and runs of
    # spaces still tokenize differently in the export.
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    if model is not None and hasattr(model, "unk_token") and model.unk_token is None and tok.unk_token is not None:
        model.unk_token = tok.unk_token
    return tok


def read_export_config(path: str) -> dict:
    """vlgpt_config.json of an export, checked for the keys generation reads."""
    check_model_dir(path)
    cfg_path = os.path.join(path, VLGPT_CONFIG)
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise ExportDirError(f"{cfg_path} missing: {path} is not a VL-GPT export "
                             "(tools/convert_checkpoint.py export-hf on a VL-GPT checkpoint)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportDirError(f"{cfg_path}: not valid JSON ({exc}); the export is damaged") from None
    need = ("visual_embed_dim", "num_image_tokens", "image_token_ids", "lora")
    missing = [k for k in need if not isinstance(config, dict) or k not in config]
    if missing:
        raise ExportDirError(f"{cfg_path}: lacks {', '.join(missing)}: not a VL-GPT export config (damaged?)")
    return config


class VLGPTOutput(NamedTuple):
    logits: torch.Tensor               # [b, S, vocab]
    visual_predictions: torch.Tensor   # [b, S, d]
    hidden_states: torch.Tensor        # [b, S, hidden], after the final norm


def load_language_model(path: str, adapter: Optional[str] = ADAPTER_DIR, dtype: Optional[torch.dtype] = None,
                        merge_lora: bool = False) -> nn.Module:
    """LlamaForCausalLM from `path`, wrapped by peft's PeftModel when `path/adapter` holds an
    adapter (merged into the weights with merge_lora)."""
    from transformers import LlamaForCausalLM
    check_model_dir(path)
    lm = _load("language model", path, LlamaForCausalLM.from_pretrained, **({"dtype": dtype} if dtype else {}))
    if adapter and os.path.isfile(os.path.join(path, adapter, "adapter_config.json")):
        from peft import PeftModel
        lm = _load("LoRA adapter", os.path.join(path, adapter), lambda p, **kw: PeftModel.from_pretrained(lm, p))
        if merge_lora:
            lm = lm.merge_and_unload()
    return lm


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword that hands a KV cache to a transformers model's forward: ``cache`` where the
    installed transformers takes it (``past_key_values`` is deprecated there, with a
    FutureWarning), ``past_key_values`` on versions that predate it."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


class VLGPTGeneration(NamedTuple):
    tokens: torch.Tensor          # [1, S]: prompt + generated (0 at visual positions, as in training)
    visual_mask: torch.Tensor     # [1, S]
    visual_embeds: torch.Tensor   # [1, S, d]: given or generated embedding at visual positions, 0 elsewhere
    images: list                  # each image's embeddings, always a whole [N, d] (for the detokenizer)


class VLGPTForCausalLM(nn.Module):
    def __init__(self, language_model: nn.Module, config: dict, image_tokenizer: Optional[nn.Module] = None):
        super().__init__()
        self.language_model = language_model
        self.config = config
        hidden = self.causal_lm.config.hidden_size
        self.visual_proj = nn.Linear(config["visual_embed_dim"], hidden)
        self.regression = nn.Linear(hidden, config["visual_embed_dim"])
        self.image_tokenizer = image_tokenizer

    @property
    def causal_lm(self):
        """The LlamaForCausalLM (LoRA layers inside it when an adapter is applied)."""
        lm = self.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def image_token_ids(self):
        return self.config["image_token_ids"]

    @classmethod
    def from_pretrained(cls, path: str, merge_lora: bool = False, dtype: Optional[torch.dtype] = None,
                        load_image_tokenizer: bool = True) -> "VLGPTForCausalLM":
        config = read_export_config(path)
        cfg_path = os.path.join(path, VLGPT_CONFIG)
        adapter = config["lora"].get("adapter")
        if adapter and not os.path.isfile(os.path.join(path, adapter, "adapter_config.json")):
            raise ExportDirError(f"{cfg_path} names the LoRA adapter {adapter}/, but {path}/{adapter} holds none")
        lm = load_language_model(path, adapter, dtype, merge_lora)
        image_tokenizer = None
        if load_image_tokenizer and config.get("image_tokenizer"):
            from ..model.image_tokenizer import ImageTokenizer
            image_tokenizer = ImageTokenizer.from_pretrained(os.path.join(path, config["image_tokenizer"]))
        model = cls(lm, config, image_tokenizer)
        heads_path = os.path.join(path, VLGPT_HEADS)
        if not os.path.isfile(heads_path):
            raise ExportDirError(f"{heads_path}: missing (the visual projection and regression head of {path})")
        try:
            heads = load_file(heads_path)
            model.visual_proj.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items()
                                               if k.startswith("visual_proj.")})
            model.regression.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items()
                                              if k.startswith("regression.")})
        except Exception as exc:   # safetensors' own error, or heads of another shape
            msg = " ".join(str(exc).split())
            raise ExportDirError(f"{heads_path}: cannot load the visual heads ({type(exc).__name__}: {msg[:300]})") \
                from None
        dtype = dtype or next(model.causal_lm.parameters()).dtype
        model.visual_proj.to(dtype)
        model.regression.to(dtype)
        return model.eval()

    def embed(self, input_ids: torch.Tensor, visual_embeds: Optional[torch.Tensor] = None,
              visual_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.causal_lm.get_input_embeddings()(input_ids)
        if visual_mask is None:
            return x
        v = self.visual_proj(visual_embeds.to(x.dtype))
        return torch.where(visual_mask.unsqueeze(-1), v, x)

    def forward(self, input_ids: torch.Tensor, visual_embeds: Optional[torch.Tensor] = None,
                visual_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> VLGPTOutput:
        lm = self.causal_lm
        hidden = lm.model(inputs_embeds=self.embed(input_ids, visual_embeds, visual_mask),
                          attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return VLGPTOutput(lm.lm_head(hidden), self.regression(hidden), hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, visual_embeds: Optional[torch.Tensor] = None,
                 visual_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                 eos_token_id: Optional[int] = None, max_new_images: Optional[int] = None) -> VLGPTGeneration:
        """Greedy interleaved generation for one sequence, as VL-GPT decodes: text by argmax
        until [IMG]; then N visual embeddings, each the regression head's prediction fed back
        through the visual projection; then [/IMG] and text again. A prompt may end inside an
        image ([IMG] + fewer than N visual positions): the image is completed first.
        KV-cached (transformers' DynamicCache), by the decode loop the library's generate runs
        (megatron_vl.inference.decode_loop), so the same rules: max_new_tokens counts text tokens
        ([IMG] included) only; an opened image always gets its N embeddings and [/IMG], outside
        that budget; max_new_images (default: no limit) suppresses [IMG] once reached; an image
        that would not fit the position table (max_position_embeddings) is never opened
        (generation ends before its [IMG]). So each entry of ``images`` is a whole [N, d] (a
        prompt's open image: its given embeddings, then the generated ones)."""
        if input_ids.shape[0] != 1:
            raise ValueError("generate() takes one sequence (batch size 1)")
        if input_ids.shape[1] == 0:
            raise ValueError("generate() needs a prompt of at least one element (input_ids is empty)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
        if max_new_images is not None and (isinstance(max_new_images, bool) or not isinstance(max_new_images, int)
                                           or max_new_images < 0):
            raise ValueError(f"max_new_images must be None (no limit) or 0 or more, got {max_new_images!r}")
        step = CachedStep(self)
        dev, d = step.device, step.visual_dim   # every tensor made here lives where the model does
        input_ids = input_ids.to(dev)
        mask = visual_mask.to(dev) if visual_mask is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        vis = (visual_embeds.to(dev) if visual_embeds is not None
               else torch.zeros(*input_ids.shape, d, device=dev)).float()
        length = input_ids.shape[1]
        if length > step.max_positions:
            raise ValueError(f"the prompt has {length} elements, more than the model's {step.max_positions} positions "
                             "(max_position_embeddings)")
        prompt = Prompt(input_ids[0].tolist(), [v if m else None for v, m in zip(vis[0], mask[0].tolist())])
        given = open_image(prompt, step.img, step.num_image_tokens)
        if given is not None and length + (step.num_image_tokens - given) + 1 > step.max_positions:
            raise ValueError(f"the prompt ends inside an image that cannot be completed within the model's "
                             f"{step.max_positions} positions (max_position_embeddings)")
        out = decode_loop(step, [prompt], Sampling(max_new_tokens=max_new_tokens, max_new_images=max_new_images),
                          eos_token_id)[0]
        new_visual = torch.tensor([[k == "visual" for k in out.kinds]], dtype=torch.bool, device=dev)
        embeds = torch.zeros(1, len(out.tokens), d, device=dev)
        if out.images:   # the generated embeddings: the images' rows after the prompt's own
            embeds[new_visual] = torch.cat(out.images)[given or 0:]
        return VLGPTGeneration(torch.cat([input_ids, torch.tensor([out.tokens], dtype=input_ids.dtype, device=dev)], 1),
                               torch.cat([mask, new_visual], 1), torch.cat([vis, embeds], 1), out.images)


class CachedStep(DecodeStep):
    """VLGPTForCausalLM under the decode loop: transformers' DynamicCache keeps the keys and
    values, so each step runs only the new elements."""

    def __init__(self, model: VLGPTForCausalLM):
        from transformers import DynamicCache
        lm = model.causal_lm
        ids = model.image_token_ids
        super().__init__(img=ids["[IMG]"], img_end=ids["[/IMG]"], num_image_tokens=model.config["num_image_tokens"],
                         visual_dim=model.config["visual_embed_dim"], device=model.regression.weight.device,
                         dtype=model.regression.weight.dtype,
                         max_positions=getattr(lm.config, "max_position_embeddings", None) or float("inf"))
        self.model, self.lm, self.cache = model, lm, DynamicCache()
        self.hidden = None   # [b, 1, hidden]: the last element's final hidden state

    def forward(self, ids, visual, visual_mask, attention_mask, position_ids) -> None:
        self.hidden = self.lm.model(inputs_embeds=self.model.embed(ids, visual, visual_mask),
                                    attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                                    **cache_kwargs(self.lm.model, self.cache)).last_hidden_state[:, -1:]

    def logits(self) -> torch.Tensor:
        return self.lm.lm_head(self.hidden)[:, -1]

    def regressed(self) -> torch.Tensor:
        return self.model.regression(self.hidden)[:, -1]

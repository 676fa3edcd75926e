"""Visual embeddings back to pixels: the image detokenizer's conditions decoded by Stable
Diffusion 1.5 with IP-Adapter-Plus, through diffusers (VL-GPT §3.1, Fig. 3).

z_t is the prompt embedding, z_v the IP-Adapter image embedding. Modes: ``both`` (default),
``image`` (z_v only: the prompt is SD's empty-prompt embedding) and ``text`` (z_t only: the
adapter's scale is 0). Classifier-free guidance is diffusers' own: the negative prompt is
the empty prompt's embedding and the negative image embedding is the IP-Adapter encoder's
output for a zero image (what diffusers' encode_image uses), not zeros. Everything is read
from local directories; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import torch

from ..console import quiet_ip_adapter_load
from ..model.detokenizer_targets import ImageConditionEncoder
from ..model.directory import PartDirectoryError, load_pretrained
from ..model.image_detokenizer import ImageDetokenizer

MODES = ("both", "image", "text")


class DiffusionDecoder:
    def __init__(self, detokenizer: ImageDetokenizer, sd_dir: Optional[str] = None,
                 ip_adapter_dir: Optional[str] = None, ip_adapter_weight: Optional[str] = None,
                 device="cpu", dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusionPipeline
        c = detokenizer.cfg
        sd_dir, ip_adapter_dir = sd_dir or c.sd_dir, ip_adapter_dir or c.ip_adapter_dir
        ip_adapter_weight = ip_adapter_weight or c.ip_adapter_weight
        for what, path in (("Stable Diffusion directory (--sd-model)", sd_dir),
                           ("IP-Adapter-Plus directory (--ip-adapter)", ip_adapter_dir)):
            if not path or not os.path.isdir(path):
                raise FileNotFoundError(f"{what} {path}: no such directory (the detokenizer records the one it "
                                        "was trained with; name another with the flag)")
        if not os.path.isfile(os.path.join(ip_adapter_dir, ip_adapter_weight)):
            raise FileNotFoundError(f"{os.path.join(ip_adapter_dir, ip_adapter_weight)}: no IP-Adapter-Plus weights")
        self.device, self.dtype = torch.device(device), dtype
        self.detokenizer = detokenizer.to(self.device).eval()
        self.pipe = load_pretrained(StableDiffusionPipeline, sd_dir, "Stable Diffusion pipeline (--sd-model)",
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                    dtype=dtype)
        weight_file = os.path.join(ip_adapter_dir, ip_adapter_weight)
        try:
            with quiet_ip_adapter_load():   # diffusers' own cast and our image_encoder_folder=None: no news
                self.pipe.load_ip_adapter(ip_adapter_dir, subfolder="", weight_name=ip_adapter_weight,
                                          image_encoder_folder=None)
        except Exception as exc:   # noqa: BLE001 - damaged, or not IP-Adapter-Plus weights (safetensors, pickle...)
            msg = " ".join(str(exc).split())[:300]
            raise PartDirectoryError(f"{weight_file}: cannot load the IP-Adapter-Plus weights "
                                     f"({type(exc).__name__}: {msg})") from None
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        encoder = ImageConditionEncoder(os.path.join(ip_adapter_dir, "image_encoder")).to(self.device)
        size = encoder.encoder.config.image_size
        with torch.no_grad():
            self.negative_image = encoder(torch.zeros(1, 3, size, size, device=self.device)).to(dtype)
            self.empty_prompt = self.pipe.encode_prompt("", self.device, 1, False)[0].to(dtype)
        expected = (c.image_cond_tokens, c.image_cond_dim, c.text_cond_tokens, c.text_cond_dim)
        found = (*self.negative_image.shape[1:], *self.empty_prompt.shape[1:])
        if tuple(found) != expected:
            raise ValueError(f"the detokenizer predicts conditions {expected[:2]} / {expected[2:]}, the decoder's "
                             f"encoders give {tuple(found[:2])} / {tuple(found[2:])}: other SD / IP-Adapter models")

    @torch.no_grad()
    def conditions(self, visual_embeds: torch.Tensor):
        """x_v [b, N, d] -> (z_v, z_t) in the decoder's dtype."""
        z_v, z_t = self.detokenizer(visual_embeds.to(self.device).float())
        return z_v.to(self.dtype), z_t.to(self.dtype)

    @torch.no_grad()
    def decode(self, visual_embeds: torch.Tensor, mode: str = "both", height: Optional[int] = None,
               width: Optional[int] = None, steps: int = 50, guidance_scale: float = 7.5,
               seed: Union[int, Sequence[int]] = 0) -> List:
        """[b, N, d] (or [N, d]) visual embeddings -> b PIL images. ``seed``: one seed for the
        batch's noise, or one per image (an image then comes out the same whichever batch, and
        whichever rank, draws it)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        if visual_embeds.dim() == 2:
            visual_embeds = visual_embeds.unsqueeze(0)
        z_v, z_t = self.conditions(visual_embeds)
        b = z_v.shape[0]
        if mode == "image":
            z_t = self.empty_prompt.expand(b, -1, -1)
        self.pipe.set_ip_adapter_scale(0.0 if mode == "text" else 1.0)
        image_embeds = z_v[:, None]          # [b, one image per prompt, tokens, width]
        if guidance_scale > 1:               # diffusers takes [negative; positive] along the batch
            image_embeds = torch.cat([self.negative_image.expand(b, -1, -1)[:, None], image_embeds])
        if isinstance(seed, int):
            generator = torch.Generator(device="cpu").manual_seed(seed)
        else:
            if len(seed) != b:
                raise ValueError(f"{len(seed)} seeds for {b} images")
            generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed]
        out = self.pipe(prompt_embeds=z_t, negative_prompt_embeds=self.empty_prompt.expand(b, -1, -1),
                        ip_adapter_image_embeds=[image_embeds], height=height, width=width,
                        num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                        output_type="pil")
        return out.images


def reconstruct(images: Sequence, tokenizer, processor, decoder: DiffusionDecoder, mode: str = "both",
                **decode_args) -> List:
    """Images -> tokenizer -> x_v -> detokenizer + diffusion -> images (the stage-1 round trip)."""
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    device = next(tokenizer.parameters()).device
    with torch.no_grad():
        x_v = tokenizer(pixels.to(device, next(tokenizer.parameters()).dtype))
    return decoder.decode(x_v, mode, **decode_args)

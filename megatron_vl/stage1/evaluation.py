"""Reconstruction quality, the SEED / VL-GPT Table 1 protocol: each original image and its
reconstruction through tokenizer -> detokenizer -> diffusion are embedded by a CLIP image
encoder; the score is their cosine similarity, averaged over the evaluation images, per
decoding mode."""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch

from ..errors import InputError
from ..model.directory import load_pretrained
from ..inference.diffusion_decoder import DiffusionDecoder, reconstruct


class ClipImageScorer:
    """CLIP image embeddings (CLIPVisionModelWithProjection's image_embeds) from a local directory."""

    def __init__(self, clip_dir: str, device="cpu"):
        from transformers import CLIPVisionModelWithProjection
        from ..console import clip_image_processor_class
        what = "CLIP scoring model (--clip-score-model)"
        hint = (": a CLIPVisionModel directory has no visual projection; name a CLIP model saved with it "
                "(CLIPModel or CLIPVisionModelWithProjection, e.g. openai/clip-vit-large-patch14)")
        self.model = load_pretrained(CLIPVisionModelWithProjection, clip_dir, what, complete=True,
                                     hint=hint).to(device).eval()
        self.processor = load_pretrained(clip_image_processor_class(), clip_dir, f"image processor of the {what}")
        self.device = device

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return torch.nn.functional.normalize(self.model(pixel_values=pixels).image_embeds.float(), dim=-1)

    def similarity(self, originals: Sequence, reconstructions: Sequence) -> torch.Tensor:
        """Cosine similarity of each pair, [b]."""
        return (self.embed(originals) * self.embed(reconstructions)).sum(-1).cpu()


def evaluate_reconstruction(images: Iterable, tokenizer, processor, decoder: DiffusionDecoder,
                            scorer: ClipImageScorer, modes: Sequence[str], batch_size: int = 8,
                            progress=None, **decode_args) -> Dict[str, Dict[str, float]]:
    """{mode: {"clip_similarity": mean, "images": count}} over `images` (PIL)."""
    scores: Dict[str, List[torch.Tensor]] = {m: [] for m in modes}

    def run(batch):
        for mode in modes:
            recon = reconstruct(batch, tokenizer, processor, decoder, mode, **decode_args)
            scores[mode].append(scorer.similarity(batch, recon))
        if progress is not None:
            progress.update(len(batch))

    batch: list = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    out = {}
    for mode, parts in scores.items():
        if not parts:
            raise InputError("no image to evaluate: the shards hold no readable pair")
        values = torch.cat(parts)
        out[mode] = {"clip_similarity": float(values.mean()), "images": int(values.numel())}
    return out

"""Batched against one-by-one generation in bf16 (benchmarks/gpu_acceptance.py's generation
check): the same random VLGPTForCausalLM, the library's generate, the decisions compared with
room for bf16 ties only."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .acceptance import FAIL, PASS
from .gpu_checks import Outcome, device


def generation_check(hidden: int, layers: int, heads: int, vocab: int, image_tokens: int, visual_dim: int,
                     prompt_lengths: Sequence[int], new_tokens: int, tie: float = 0.03,
                     image_rtol: float = 0.05) -> Outcome:
    """A random VLGPTForCausalLM in bf16 generates greedily for prompts of different lengths in
    one left-padded batch and one by one. Text must agree token for token up to the first tie:
    where the two runs pick different tokens, the one-by-one model's logits for the two must lie
    within `tie` x the largest logit (bf16 keeps 8 bits, ~0.4% per rounding, dozens deep; a
    wrong mask or position is off by far more). Text-to-image: the N embeddings must agree within
    `image_rtol` (relative Frobenius norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from ..inference.decode_loop import Prompt
    from ..inference.generation import generate
    from ..inference.modeling_vlgpt import VLGPTForCausalLM
    from ..inference.sampling import Sampling
    dev = device()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 8 * 8,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(heads // 4, 1), vocab_size=vocab,
                                      max_position_embeddings=max(prompt_lengths) + new_tokens + image_tokens + 8))
    model = VLGPTForCausalLM(lm, {"visual_embed_dim": visual_dim, "num_image_tokens": image_tokens,
                                  "image_token_ids": {"[IMG]": vocab - 2, "[/IMG]": vocab - 1}})
    model = model.to(dev, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt(ids, [None] * len(ids))
               for ids in (torch.randint(0, vocab - 2, (n,), generator=g).tolist() for n in prompt_lengths)]
    rows, bad = [], []
    with torch.no_grad():
        text = Sampling(max_new_tokens=new_tokens, text_only=True)
        for p, batched in zip(prompts, generate(model, prompts, text)):
            alone = generate(model, [p], text)[0]
            row = _first_difference(model, p, alone.tokens, batched.tokens, tie)
            rows.append(row)
            if not row["ok"]:
                bad.append(f"prompt of {len(p.tokens)}: {row['why']}")
        images = Sampling(max_new_tokens=4, text_to_image=True)
        for p, batched in zip(prompts[:2], generate(model, prompts[:2], images)):
            alone = generate(model, [p], images)[0]
            if len(alone.images) != 1 or len(batched.images) != 1:
                bad.append(f"text-to-image, prompt of {len(p.tokens)}: {len(alone.images)} image(s) alone, "
                           f"{len(batched.images)} batched")
                continue
            a, b = alone.images[0].float(), batched.images[0].float()
            rel = float((a - b).norm() / a.norm().clamp(min=1e-12))
            rows.append({"image_prompt": len(p.tokens), "relative_error": rel, "ok": rel <= image_rtol})
            if rel > image_rtol:
                bad.append(f"text-to-image, prompt of {len(p.tokens)}: embeddings {rel:.2%} apart")
    exact = sum(1 for r in rows if r.get("first_difference") is None and "image_prompt" not in r)
    ties = sum(1 for r in rows if r.get("first_difference") is not None and r["ok"])
    summary = (f"{len(prompts)} text prompts: {exact} identical, {ties} apart only after a bf16 tie; "
               f"2 text-to-image prompts: embeddings within {max(r.get('relative_error', 0) for r in rows):.2%}")
    return (FAIL if bad else PASS), ("; ".join(bad) if bad else summary), {"rows": rows}


def _first_difference(model, prompt, alone: List[int], batched: List[int], tie: float) -> Dict:
    if alone == batched:
        return {"prompt": len(prompt.tokens), "first_difference": None, "ok": True}
    j = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), min(len(alone), len(batched)))
    if j >= min(len(alone), len(batched)):
        return {"prompt": len(prompt.tokens), "first_difference": j, "ok": False,
                "why": f"{len(alone)} tokens alone, {len(batched)} batched"}
    ids = torch.tensor([prompt.tokens + alone[:j]], device=model.regression.weight.device)
    logits = model(ids).logits[0, -1].float()
    margin = float((logits[alone[j]] - logits[batched[j]]).abs())
    scale = float(logits.abs().max())
    ok = margin <= tie * scale
    return {"prompt": len(prompt.tokens), "first_difference": j, "margin": margin, "largest_logit": scale, "ok": ok,
            "why": f"token {j} differs ({alone[j]} alone, {batched[j]} batched) with logits {margin:.3g} apart, "
                   f"over {tie:g} x {scale:.3g}"}

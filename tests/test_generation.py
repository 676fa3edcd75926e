"""Any-to-any generation from a tiny VL-GPT export: interleaved outputs agree with full
forward passes, batches of different lengths equal one-by-one runs, the samplers and stop
strings, image prompts through the export's image tokenizer, and PNGs of generated images
through its detokenizer and diffusers."""

import os

import pytest
import torch

from megatron_vl.inference.generation import Generator, Prompt, Sampling, build_prompt, generate
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, PY, run_script


@pytest.fixture(scope="module")
def gen(export):
    return Generator(str(export), add_bos=False)


def sequence(prompt: Prompt, out, n_visual):
    """The whole sequence (prompt + generated elements) as model inputs."""
    tokens = prompt.tokens + out.tokens
    visual = [v for v in prompt.visual]
    images = iter(out.images)   # every image whole ([N, d]): no partial one exists
    block, k = None, 0
    for t in out.tokens:
        if t == 0 and (block is None or k == n_visual):
            block, k = next(images), 0
        if t == 0:
            visual.append(block[k])
            k += 1
        else:
            visual.append(None)
    mask = torch.tensor([[v is not None for v in visual]])
    embeds = torch.stack([v if v is not None else torch.zeros(EMBED_DIM) for v in visual])[None]
    return torch.tensor([tokens]), embeds, mask


def test_interleaved_generation_equals_full_forward_passes(gen):
    img = gen.model.image_token_ids["[IMG]"]
    prompt = gen.prompt("The picture shows a red circle above a")
    opened = Prompt(prompt.tokens + [img], prompt.visual + [None])   # an image is open: N embeddings come next
    out = generate(gen.model, [opened], Sampling(max_new_tokens=NUM_IMAGE_TOKENS + 12))[0]
    assert len(out.images) >= 1 and out.images[0].shape == (NUM_IMAGE_TOKENS, EMBED_DIM)
    assert out.tokens[:NUM_IMAGE_TOKENS + 1] == [0] * NUM_IMAGE_TOKENS + [gen.model.image_token_ids["[/IMG]"]]
    ids, embeds, mask = sequence(opened, out, NUM_IMAGE_TOKENS)
    with torch.no_grad():
        full = gen.model(ids, embeds, mask)
    start = len(opened.tokens)
    for j, t in enumerate(out.tokens):
        pos = start + j - 1                    # the output at pos predicts element pos + 1
        if mask[0, pos + 1]:
            torch.testing.assert_close(embeds[0, pos + 1], full.visual_predictions[0, pos].float(),
                                       rtol=1e-4, atol=1e-5)
        elif not mask[0, pos] or t != gen.model.image_token_ids["[/IMG]"]:   # [/IMG] after N is forced
            assert t == int(full.logits[0, pos].argmax()), (j, t)


def test_batched_left_padded_equals_one_by_one(gen):
    texts = ["a", "The picture shows a green", "This page shows a few drawings. The picture shows a"]
    prompts = [gen.prompt(t) for t in texts]
    s = Sampling(max_new_tokens=NUM_IMAGE_TOKENS + 10)
    together = generate(gen.model, prompts, s, decode=gen.decode)
    for p, batched in zip(prompts, together):
        alone = generate(gen.model, [p], s, decode=gen.decode)[0]
        assert batched.tokens == alone.tokens and batched.text == alone.text
        assert len(batched.images) == len(alone.images)
        for a, b in zip(batched.images, alone.images):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_samplers_stop_strings_and_modes(gen):
    p = [gen.prompt("The picture shows a")]
    greedy = generate(gen.model, p, Sampling(max_new_tokens=10, text_only=True))[0]
    assert generate(gen.model, p, Sampling(max_new_tokens=10, temperature=0.7, top_k=1, text_only=True))[0].tokens \
        == greedy.tokens
    assert generate(gen.model, p, Sampling(max_new_tokens=10, temperature=0.7, top_p=1e-6, text_only=True))[0].tokens \
        == greedy.tokens
    a = generate(gen.model, p, Sampling(max_new_tokens=10, temperature=1.5, seed=3))[0]
    b = generate(gen.model, p, Sampling(max_new_tokens=10, temperature=1.5, seed=3))[0]
    assert a.tokens == b.tokens
    ids = gen.model.image_token_ids
    assert ids["[IMG]"] not in greedy.tokens
    full = generate(gen.model, p, Sampling(max_new_tokens=10, text_only=True), decode=gen.decode)[0]
    assert len(full.text) >= 4, full.text
    cut = full.text[2:4]
    stopped = generate(gen.model, p, Sampling(max_new_tokens=10, text_only=True, stop=(cut,)), decode=gen.decode)[0]
    assert stopped.stopped_by == "stop string" and stopped.text == full.text[:full.text.index(cut)]
    t2i = generate(gen.model, p, Sampling(max_new_tokens=40, text_to_image=True), decode=gen.decode)[0]
    assert t2i.stopped_by == "image" and len(t2i.images) == 1 and t2i.text == "<image>"
    assert t2i.tokens == [0] * NUM_IMAGE_TOKENS + [ids["[/IMG]"]]


def test_image_prompts_use_the_export_image_tokenizer(gen, vl_data):
    from PIL import Image
    root = os.path.dirname(os.path.dirname(vl_data))
    path = os.path.join(root, "sample", "mmc4", "images", sorted(os.listdir(os.path.join(root, "sample", "mmc4",
                                                                                           "images")))[0])
    image = Image.open(path).convert("RGB")
    p = gen.prompt("<image>Question: what is shown? Short answer:", [image])
    ids = gen.model.image_token_ids
    assert p.tokens[0] == ids["[IMG]"] and p.tokens[NUM_IMAGE_TOKENS + 1] == ids["[/IMG]"]
    expected = gen.image_embeddings([image])[0]
    torch.testing.assert_close(torch.stack(p.visual[1:NUM_IMAGE_TOKENS + 1]), expected)
    with pytest.raises(ValueError, match="1 <image> tag"):
        build_prompt("<image>", gen.encode, [], 1, 2)


@pytest.mark.timeout(300)
def test_generate_tool_writes_pngs_of_the_requested_size_and_answers_image_questions(export, vl_data, tmp_path):
    out = run_script([PY, "tools/generate.py", "--hf-dir", export, "--prompt", "A photo of a red circle",
                      "--text-to-image", "--image-out", tmp_path, "--diffusion-steps", 2, "--height", 48,
                      "--width", 40, "--no-add-bos"])
    assert f"image: {tmp_path}/000_0.png" in out
    from PIL import Image
    with Image.open(tmp_path / "000_0.png") as im:
        assert im.size == (40, 48)
    root = os.path.dirname(os.path.dirname(vl_data))
    images = os.path.join(root, "sample", "mmc4", "images")
    out = run_script([PY, "tools/generate.py", "--hf-dir", export, "--prompt", "<image>Question: what? Short answer:",
                      "--image", os.path.join(images, sorted(os.listdir(images))[0]), "--text-only", "--json",
                      "--max-new-tokens", 5])
    import json
    record = json.loads([line for line in out.splitlines() if line.startswith("{")][0])
    assert record["num_images"] == 0 and isinstance(record["text"], str) and record["text"]
    out = run_script([PY, "tools/generate.py", "--hf-dir", export, "--prompt", "<image> and <image>"], expect=2)
    assert "error: the prompts hold 2 <image> tag(s), 0 --image file(s) were given" in out

"""Images out are never starved by the text budget (issue 21, items 1-3): --max-new-tokens and
max_new_tokens count text tokens only, an opened image always gets its N embeddings and
[/IMG], an image that would not fit the position table is never opened, so neither the
library (megatron_vl.inference.generation) nor VLGPTForCausalLM.generate ever returns a partial image;
the README's text-to-image command with its default flags writes a PNG. On the session's tiny
export (N = NUM_IMAGE_TOKENS)."""

import importlib.util
import os
import warnings

import pytest
import torch

from megatron_vl.errors import run_cli
from megatron_vl.inference.generation import Generator, Prompt, Sampling, generate
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = NUM_IMAGE_TOKENS


@pytest.fixture(scope="module")
def gen(export):
    return Generator(str(export), add_bos=False)


@pytest.fixture(scope="module")
def generate_tool():
    spec = importlib.util.spec_from_file_location("_images_out_generate", os.path.join(ROOT, "tools", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A submodule is swapped through the module's _modules (monkeypatch.setitem), not setattr:
# pytest 9.2's setattr restores an attribute missing from the instance __dict__ by deleting it,
# and nn.Module keeps submodules in _modules, so the model would lose its lm_head for good.
class AlwaysImage(torch.nn.Module):
    """An lm_head that makes [IMG] the argmax: the model opens an image at every text step."""

    def __init__(self, head, img):
        super().__init__()
        self.head, self.img = head, img

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.img] = 1e4
        return logits


def whole(images):
    return all(tuple(i.shape) == (N, EMBED_DIM) for i in images)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--max-new-tokens", str(N)], ["--max-new-tokens", "1"]],
                         ids=["defaults", "max-new-tokens=N", "max-new-tokens=1"])
def test_readme_text_to_image_command_writes_a_png(export, generate_tool, tmp_path, capsys, extra):
    # The README's command (default --max-new-tokens 32 was N in the quickstart: no PNG, and
    # "cut short after 32 of its 32 embeddings"); a size is asked for, and few diffusion steps.
    out_dir = tmp_path / "out"
    argv = ["--hf-dir", str(export), "--prompt", "A photo of a red circle", "--text-to-image",
            "--image-out", f"{out_dir}/", "--height", "48", "--width", "40", "--diffusion-steps", "2", *extra]
    capsys.readouterr()
    assert run_cli(generate_tool.main, argv) == 0
    said = capsys.readouterr()
    png = out_dir / "000_0.png"
    assert f"image: {out_dir}/000_0.png" in said.out, said.out + said.err
    assert "note:" not in said.out and "cut short" not in said.out + said.err
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (40, 48)


def test_the_library_never_returns_a_partial_image(gen, monkeypatch):
    ids = gen.model.image_token_ids
    prompt = gen.prompt("The picture shows a red circle above a")
    # An image opened by the prompt, with a text budget of 1: completed all the same.
    opened = Prompt(prompt.tokens + [ids["[IMG]"]], prompt.visual + [None])
    out = generate(gen.model, [opened], Sampling(max_new_tokens=1), decode=gen.decode)[0]
    assert out.tokens[:N + 1] == [0] * N + [ids["[/IMG]"]] and whole(out.images) and len(out.images) >= 1
    assert out.stopped_by in ("max tokens", "eos")
    # A prompt ending inside an image (3 given embeddings): the image returned is the whole [N, d].
    given = [torch.randn(EMBED_DIM) for _ in range(3)]
    inside = Prompt(opened.tokens + [0] * 3, opened.visual + given)
    out = generate(gen.model, [inside], Sampling(max_new_tokens=1))[0]
    assert whole(out.images) and torch.equal(out.images[0][:3], torch.stack(given))
    # A model that opens an image at every text step: each one whole, however small the budget.
    monkeypatch.setitem(gen.model.causal_lm._modules, "lm_head", AlwaysImage(gen.model.causal_lm.lm_head, ids["[IMG]"]))
    for budget in (1, 2, 3):
        out = generate(gen.model, [prompt], Sampling(max_new_tokens=budget), decode=gen.decode)[0]
        assert out.stopped_by == "max tokens" and len(out.images) == budget and whole(out.images)
        assert out.tokens == ([ids["[IMG]"]] + [0] * N + [ids["[/IMG]"]]) * budget
        assert out.text == "<image>" * budget
    capped = generate(gen.model, [prompt], Sampling(max_new_tokens=3, max_new_images=1), decode=gen.decode)[0]
    assert len(capped.images) == 1 and capped.tokens.count(ids["[IMG]"]) == 1 and len(capped.tokens) <= N + 4


def test_an_image_that_would_not_fit_the_position_table_is_never_opened(gen, monkeypatch):
    ids = gen.model.image_token_ids
    limit = gen.max_positions
    word = gen.encode("a")[0]

    def prompt(length):
        return Prompt([word] * length, [None] * length)

    # text-to-image: [IMG] + N + [/IMG] need N + 2 positions after the prompt.
    fits = generate(gen.model, [prompt(limit - N - 2)], Sampling(text_to_image=True))[0]
    assert fits.stopped_by == "image" and whole(fits.images) and len(fits.images) == 1 and not fits.image_not_opened
    short = generate(gen.model, [prompt(limit - N - 1), prompt(3)], Sampling(text_to_image=True))
    assert short[0].stopped_by == "position limit" and short[0].image_not_opened and short[0].images == []
    assert short[0].tokens == [] and short[1].stopped_by == "image" and whole(short[1].images)
    # Sampled images: the last one that fits is whole, the next is not opened.
    monkeypatch.setitem(gen.model.causal_lm._modules, "lm_head", AlwaysImage(gen.model.causal_lm.lm_head, ids["[IMG]"]))
    start = limit - 3 * (N + 2) + 1        # room for two whole images and N + 1 more positions
    out = generate(gen.model, [prompt(start)], Sampling(max_new_tokens=limit))[0]
    assert out.stopped_by == "position limit" and out.image_not_opened
    assert len(out.images) == 2 and whole(out.images) and len(out.tokens) == 2 * (N + 2)


def test_vlgpt_generate_follows_the_same_rule(gen, monkeypatch):
    model, ids = gen.model, gen.model.image_token_ids
    p = gen.prompt("The picture shows a red circle above a")
    x = torch.tensor([p.tokens])
    # The case: images [(N, d), (partial, d)] from max_new_tokens; now whole, and the
    # same elements as the library's decode loop.
    monkeypatch.setitem(model.causal_lm._modules, "lm_head", AlwaysImage(model.causal_lm.lm_head, ids["[IMG]"]))
    for budget in (1, 2):
        out = model.generate(x, max_new_tokens=budget)
        lib = generate(model, [p], Sampling(max_new_tokens=budget))[0]
        assert [tuple(i.shape) for i in out.images] == [(N, EMBED_DIM)] * budget
        assert out.tokens[0, x.shape[1]:].tolist() == lib.tokens
        for a, b in zip(out.images, lib.images):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(model.generate(x, max_new_tokens=3, max_new_images=1).images) == 1
    # Up against the position table: never a partial image.
    limit = gen.max_positions
    long = torch.full((1, limit - 2 * (N + 2) + 1), gen.encode("a")[0])
    out = model.generate(long, max_new_tokens=limit)
    assert [tuple(i.shape) for i in out.images] == [(N, EMBED_DIM)] and out.tokens.shape[1] == long.shape[1] + N + 2
    monkeypatch.undo()
    # A prompt ending inside an image: the entry is the whole image, its given embeddings first.
    given = torch.randn(1, 3, EMBED_DIM)
    tokens = torch.tensor([p.tokens + [ids["[IMG]"], 0, 0, 0]])
    embeds = torch.cat([torch.zeros(1, len(p.tokens) + 1, EMBED_DIM), given], 1)
    mask = torch.tensor([[False] * (len(p.tokens) + 1) + [True] * 3])
    out = model.generate(tokens, embeds, mask, max_new_tokens=4)
    assert [tuple(i.shape) for i in out.images][:1] == [(N, EMBED_DIM)] and torch.equal(out.images[0][:3], given[0])
    assert int(out.tokens[0, tokens.shape[1] + N - 3]) == ids["[/IMG]"]


def test_our_generation_calls_raise_no_past_key_values_warning(gen):
    p = gen.prompt("The picture shows a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(gen.model, [p], Sampling(max_new_tokens=2))
        gen.model.generate(torch.tensor([p.tokens]), max_new_tokens=2)
    said = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not said, said

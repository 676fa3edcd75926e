"""The way back to pixels: the detokenizer's conditions through SD 1.5 + IP-Adapter-Plus in
diffusers (tiny random models in the real layouts), in the three modes, with diffusers'
classifier-free guidance; raw embeddings from a VL-GPT export decode too; the
reconstruction evaluation scores with a CLIP image encoder."""

import json
import os

import pytest
import torch

from megatron_vl.model.detokenizer_targets import ImageConditionEncoder, condition_shapes
from megatron_vl.model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig
from megatron_vl.inference.diffusion_decoder import DiffusionDecoder, MODES
from megatron_vl.testing.scripts import run_tool
from megatron_vl.testing.tiny_models import save_tiny_ip_adapter, save_tiny_ip_image_encoder, save_tiny_sd
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS

LAYOUTS = ["ip-adapter-plus_sd15.bin", "ip-adapter-plus_sd15.safetensors"]


@pytest.fixture(scope="module")
def decoding(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode")
    save_tiny_sd(str(d / "sd"))
    for weight in LAYOUTS:
        save_tiny_ip_adapter(str(d / "ip"), str(d / "sd"), weight)
    shapes = condition_shapes(str(d / "ip" / "image_encoder"), str(d / "sd"))
    torch.manual_seed(0)
    detok = ImageDetokenizer(ImageDetokenizerConfig(EMBED_DIM, *shapes, width=32, num_layers=1, num_heads=2,
                                                    sd_dir=str(d / "sd"), ip_adapter_dir=str(d / "ip"),
                                                    ip_adapter_weight=LAYOUTS[0]))
    detok.save_pretrained(str(d / "image_detokenizer"))
    return d


@pytest.mark.timeout(300)
@pytest.mark.parametrize("weight", LAYOUTS)
def test_both_adapter_layouts_decode_every_mode_at_the_requested_size(decoding, weight):
    decoder = DiffusionDecoder(ImageDetokenizer.from_pretrained(str(decoding / "image_detokenizer")),
                               ip_adapter_weight=weight)
    x = torch.randn(2, NUM_IMAGE_TOKENS, EMBED_DIM)
    for mode in MODES:
        images = decoder.decode(x, mode, height=48, width=40, steps=2)
        assert [im.size for im in images] == [(40, 48)] * 2, mode
    default = decoder.decode(x[0], "both", steps=2)          # [N, d] and the UNet's own size
    assert [im.size for im in default] == [(32, 32)]
    # Same seed, same pixels; another seed, others.
    import numpy as np
    again = decoder.decode(x[0], "both", steps=2)
    assert np.array_equal(np.asarray(default[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(default[0]), np.asarray(decoder.decode(x[0], "both", steps=2, seed=1)[0]))
    # One seed per image: an image comes out the same alone as in a batch (how evaluation keeps
    # each item's picture whatever rank or batch draws it). The batch shape still changes the
    # tiny random UNet's rounding (measured: mean 1.6, max 10 levels of 255), another seed
    # changes the picture (mean 45).
    both = decoder.decode(x, "both", steps=2, seed=[5, 7])
    for i, s in enumerate((5, 7)):
        alone = np.asarray(decoder.decode(x[i], "both", steps=2, seed=[s])[0]).astype(int)
        assert np.abs(np.asarray(both[i]).astype(int) - alone).mean() < 4
    assert np.abs(np.asarray(both[1]).astype(int)
                  - np.asarray(decoder.decode(x[1], "both", steps=2, seed=[5])[0]).astype(int)).mean() > 20
    with pytest.raises(ValueError, match="1 seeds for 2 images"):
        decoder.decode(x, "both", steps=2, seed=[5])
    with pytest.raises(ValueError, match="mode 'pixels'"):
        decoder.decode(x, "pixels")


@pytest.mark.timeout(300)
def test_guidance_negatives_are_diffusers_own_and_modes_route_the_conditions(decoding, monkeypatch):
    decoder = DiffusionDecoder(ImageDetokenizer.from_pretrained(str(decoding / "image_detokenizer")))
    encoder = ImageConditionEncoder(str(decoding / "ip" / "image_encoder"))
    zero_image = encoder(torch.zeros(1, 3, 32, 32))
    seen = {}

    def capture(**kw):
        seen.update(kw, scale=[p.scale for p in decoder.pipe.unet.attn_processors.values() if hasattr(p, "scale")])
        raise StopIteration
    monkeypatch.setattr(type(decoder.pipe), "__call__", lambda self, **kw: capture(**kw))
    x = torch.randn(3, NUM_IMAGE_TOKENS, EMBED_DIM)
    z_v, z_t = decoder.conditions(x)
    empty = decoder.pipe.encode_prompt("", "cpu", 1, False)[0]
    for mode in MODES:
        with pytest.raises(StopIteration):
            decoder.decode(x, mode, guidance_scale=5.0)
        embeds = seen["ip_adapter_image_embeds"][0]
        assert embeds.shape == (6, 1, *z_v.shape[1:])
        # [negative; positive]: the negative is the encoder's output for a zero image, not zeros.
        assert torch.equal(embeds[:3, 0], zero_image.expand(3, -1, -1)) and zero_image.abs().sum() > 0
        assert torch.equal(embeds[3:, 0], z_v)
        assert torch.equal(seen["negative_prompt_embeds"], empty.expand(3, -1, -1))
        assert torch.equal(seen["prompt_embeds"], empty.expand(3, -1, -1) if mode == "image" else z_t)
        assert set(s for scales in seen["scale"] for s in scales) == {0.0 if mode == "text" else 1.0}
    with pytest.raises(StopIteration):
        decoder.decode(x, "both", guidance_scale=1.0)        # no guidance: positives only
    assert torch.equal(seen["ip_adapter_image_embeds"][0][:, 0], z_v)


@pytest.mark.timeout(400)
def test_generated_embeddings_of_an_export_decode_to_pngs(export, tmp_path):
    """gen.images of a VL-GPT export (regression-head embeddings) -> reconstruct_images.py;
    the export ships the detokenizer it decodes with (export-hf --image-detokenizer)."""
    from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
    # A detokenizer of another visual width is refused.
    other = ImageDetokenizer(ImageDetokenizerConfig(EMBED_DIM * 2, 17, 48, 77, 24, width=32, num_layers=1, num_heads=2))
    other.save_pretrained(str(tmp_path / "other"))
    # The tools in this process (run_tool): a process would import torch and diffusers again.
    out = run_tool("tools/convert_checkpoint.py", "export-hf", "--load", export.parent / "ckpt", "--save",
                   tmp_path / "hf", "--image-detokenizer", tmp_path / "other", expect=1)
    assert f"reads visual embeddings of width {EMBED_DIM * 2}, the model's are {EMBED_DIM}" in out
    assert json.load(open(export / "vlgpt_config.json"))["image_detokenizer"] == "image_detokenizer"
    model = VLGPTForCausalLM.from_pretrained(str(export)).float()
    ids = torch.tensor([[1, 5, 7, model.image_token_ids["[IMG]"]]])
    gen = model.generate(ids, max_new_tokens=NUM_IMAGE_TOKENS + 1, max_new_images=1)
    assert len(gen.images) == 1 and gen.images[0].shape == (NUM_IMAGE_TOKENS, EMBED_DIM)
    torch.save(gen.images, tmp_path / "gen_images.pt")
    out = run_tool("tools/reconstruct_images.py", "--image-detokenizer", export / "image_detokenizer",
                   "--embeddings", tmp_path / "gen_images.pt", "--mode", "all", "--steps", 2,
                   "--height", 40, "--width", 40, "--output", tmp_path / "png")
    from PIL import Image
    for mode in MODES:
        path = tmp_path / "png" / f"gen_images_0_{mode}.png"
        assert f"wrote {path} (40x40)" in out
        with Image.open(path) as im:
            assert im.size == (40, 40) and im.format == "PNG"


@pytest.mark.timeout(300)
def test_clip_similarity_is_the_mean_cosine_of_image_embeddings(decoding, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image
    from megatron_vl.stage1 import evaluation
    save_tiny_ip_image_encoder(str(tmp_path / "clip-score"), seed=7)
    scorer = evaluation.ClipImageScorer(str(tmp_path / "clip-score"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    others = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    assert torch.allclose(scorer.similarity(images, images), torch.ones(5), atol=1e-6)
    a, b = scorer.embed(images), scorer.embed(others)
    expected = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(scorer.similarity(images, others), expected)
    # The harness averages per mode over every image, batches of any size.
    recon = dict(zip(map(id, images), others))
    monkeypatch.setattr(evaluation, "reconstruct", lambda batch, *a, **kw: [recon[id(im)] for im in batch])
    scores = evaluation.evaluate_reconstruction(iter(images), None, None, None, scorer, ["both", "text"], batch_size=2)
    assert scores == {m: {"clip_similarity": pytest.approx(float(expected.mean()), abs=1e-6), "images": 5}
                      for m in ("both", "text")}


def test_missing_directories_are_named(decoding, tmp_path):
    detok = ImageDetokenizer.from_pretrained(str(decoding / "image_detokenizer"))
    with pytest.raises(FileNotFoundError, match=f"--sd-model\\) {tmp_path}/none: no such directory"):
        DiffusionDecoder(detok, sd_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no IP-Adapter-Plus weights"):
        DiffusionDecoder(detok, ip_adapter_weight="missing.bin")
    assert os.path.isdir(detok.cfg.sd_dir)


@pytest.mark.timeout(300)
def test_eval_reconstruction_tool_scores_each_mode_over_the_shards(decoding, tmp_path):
    import shutil
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.testing.tiny_models import save_tiny_clip
    from test_pair_stream import _shard
    clip = save_tiny_clip(str(tmp_path / "clip"))
    export = tmp_path / "export"
    ImageTokenizer.from_clip(clip, ImageTokenizerConfig(NUM_IMAGE_TOKENS, EMBED_DIM, 1, 2)).save_pretrained(
        str(export / "image_tokenizer"), load_image_processor(clip))
    shutil.copytree(decoding / "image_detokenizer", export / "image_detokenizer")
    save_tiny_ip_image_encoder(str(tmp_path / "clip-score"), seed=7)
    _shard(tmp_path / "val.tar", "v", 8, 0, bad=[(0, "cutimage")])
    out = run_tool("tools/eval_reconstruction.py", "--export", export, "--shards", tmp_path / "val.tar",
                   "--clip-score-model", tmp_path / "clip-score", "--modes", "both", "text", "--max-images", 5,
                   "--batch-size", 2, "--steps", 2, "--output-json", tmp_path / "scores.json", "--no-progress")
    scores = json.load(open(tmp_path / "scores.json"))
    assert sorted(scores["scores"]) == ["both", "text"]
    assert all(s["images"] == 5 and -1 <= s["clip_similarity"] <= 1 for s in scores["scores"].values())
    assert scores["skipped"] == {"image unreadable": 1}
    assert f"both           5 {scores['scores']['both']['clip_similarity']:>16.4f}" in out
    assert f"skipped (image unreadable): 1  first at {tmp_path / 'val.tar'}:v0000" in out

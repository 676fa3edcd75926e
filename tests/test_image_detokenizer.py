"""Stage 1 pieces on tiny local models: the detokenizer's shapes follow the encoders'
configs, the targets are exactly what IP-Adapter-Plus and SD 1.5 condition on, the loss and
its λ ablations, the directory format, and the tokenizer's CLIP layer choice."""

import copy

import numpy as np
import pytest
import torch

from megatron_vl.model.detokenizer_targets import ImageConditionEncoder, TextConditionEncoder, condition_shapes
from megatron_vl.model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig, detokenizer_loss
from megatron_vl.testing.tiny_models import save_tiny_clip, save_tiny_ip_image_encoder, save_tiny_sd_text

CAPTIONS = ["a red circle above a blue square", "two green triangles!"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    return save_tiny_ip_image_encoder(str(d / "image_encoder")), save_tiny_sd_text(str(d / "sd"))


def _images(n=2, size=40):
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def _detokenizer(encoders, embed_dim=12):
    tokens_v, dim_v, tokens_t, dim_t = condition_shapes(*encoders)
    torch.manual_seed(0)
    return ImageDetokenizer(ImageDetokenizerConfig(embed_dim=embed_dim, image_cond_tokens=tokens_v,
                                                   image_cond_dim=dim_v, text_cond_tokens=tokens_t,
                                                   text_cond_dim=dim_t, width=32, num_layers=2, num_heads=4,
                                                   sd_dir=encoders[1], ip_adapter_dir=encoders[0]))


def test_targets_are_the_conditions_ip_adapter_and_sd_use(encoders):
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection
    enc_dir, sd_dir = encoders
    image, text = ImageConditionEncoder(enc_dir), TextConditionEncoder(sd_dir)
    assert condition_shapes(enc_dir, sd_dir) == (17, 48, 77, 24) == (*image.shape, *text.shape)
    images = _images()
    e_v = image(image.pixels(images))
    ref_model = CLIPVisionModelWithProjection.from_pretrained(enc_dir)
    pixels = CLIPImageProcessor.from_pretrained(enc_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert e_v.shape == (2, 17, 48) and torch.equal(e_v, ref)
    e_t = text(text.token_ids(CAPTIONS))
    tok = CLIPTokenizer.from_pretrained(f"{sd_dir}/tokenizer")
    ids = tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        ref = CLIPTextModel.from_pretrained(f"{sd_dir}/text_encoder")(input_ids=ids)[0]
    assert e_t.shape == (2, 77, 24) and torch.equal(e_t, ref)
    for module in (image, text):   # frozen, and stays in eval mode
        module.train()
        assert not module.encoder.training and not any(p.requires_grad for p in module.parameters())
    with pytest.raises(FileNotFoundError, match=r"no text_encoder/ \(the diffusers layout\)"):
        TextConditionEncoder(enc_dir)


def test_detokenizer_shapes_loss_ablations_and_directory(encoders, tmp_path):
    model = _detokenizer(encoders)
    x_v = torch.randn(3, 8, 12)
    z_v, z_t = model(x_v)
    assert z_v.shape == (3, 17, 48) and z_t.shape == (3, 77, 24)
    e_v, e_t = torch.randn_like(z_v), torch.randn_like(z_t)
    total, image, text = detokenizer_loss(z_v, z_t, e_v, e_t, 1.0, 1.0)
    assert torch.allclose(image, ((z_v - e_v) ** 2).mean()) and torch.allclose(text, ((z_t - e_t) ** 2).mean())
    assert torch.allclose(total, image + text)
    for lambdas, trained, untouched in (((1.0, 0.0), "image_head", "text_head"), ((0.0, 1.0), "text_head", "image_head")):
        model.zero_grad(set_to_none=True)
        z_v, z_t = model(x_v)
        detokenizer_loss(z_v, z_t, e_v, e_t, *lambdas)[0].backward()
        assert getattr(model, trained).weight.grad.abs().sum() > 0
        assert getattr(model, untouched).weight.grad is None
    with pytest.raises(ValueError, match="both 0: nothing to train"):
        detokenizer_loss(z_v, z_t, e_v, e_t, 0.0, 0.0)
    model.save_pretrained(str(tmp_path / "detok"))
    back = ImageDetokenizer.from_pretrained(str(tmp_path / "detok"))
    assert back.cfg == model.cfg and back.cfg.sd_dir == encoders[1]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x_v), back(x_v)))
    with pytest.raises(FileNotFoundError, match="not an image detokenizer directory"):
        ImageDetokenizer.from_pretrained(str(tmp_path))


def test_detokenizer_learns_fixed_targets(encoders):
    model = _detokenizer(encoders)
    gen = torch.Generator().manual_seed(1)
    x_v, e_v, e_t = torch.randn(4, 8, 12, generator=gen), torch.randn(4, 17, 48, generator=gen), \
        torch.randn(4, 77, 24, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = detokenizer_loss(*model(x_v), e_v, e_t)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_image_tokenizer_reads_the_chosen_clip_layer(tmp_path):
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    clip = save_tiny_clip(str(tmp_path / "clip"), layers=3)
    cfg = ImageTokenizerConfig(num_tokens=3, embed_dim=5, num_heads=2, clip_layer="penultimate")
    model = ImageTokenizer.from_clip(clip, cfg).eval()
    # hidden_states[-2] of the full tower is the last hidden state of the tower minus its last layer.
    truncated = copy.deepcopy(model)
    truncated.cfg = ImageTokenizerConfig(num_tokens=3, embed_dim=5, num_heads=2, clip_layer="last")
    tower = getattr(truncated.clip, "vision_model", truncated.clip)   # transformers 4.x nests it, 5.x not
    tower.encoder.layers = tower.encoder.layers[:-1]
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(px), truncated(px))
        last = ImageTokenizer(ImageTokenizerConfig(num_tokens=3, embed_dim=5, num_heads=2), model.clip).eval()
        last.load_state_dict(model.state_dict())
        assert not torch.equal(model(px), last(px))
    model.save_pretrained(str(tmp_path / "tok"), load_image_processor(clip))
    back = ImageTokenizer.from_pretrained(str(tmp_path / "tok")).eval()
    assert back.cfg.clip_layer == "penultimate"
    with torch.no_grad():
        assert torch.equal(back(px), model(px))
    with pytest.raises(ValueError, match="clip_layer 'middle'"):
        ImageTokenizer.from_clip(clip, ImageTokenizerConfig(num_heads=2, clip_layer="middle"))

"""Small random models in their real formats, for the quickstart and the tests (no downloads)."""

from __future__ import annotations

from ..console import clip_image_processor_class


def save_tiny_clip(path: str, image_size: int = 32, width: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random transformers CLIPVisionModel plus its CLIPImageProcessor, saved to `path`."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(path)
    clip_image_processor_class()(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_ip_image_encoder(path: str, image_size: int = 32, width: int = 48, layers: int = 3,
                               projection_dim: int = 16, seed: int = 1) -> str:
    """A random CLIPVisionModelWithProjection + CLIPImageProcessor: IP-Adapter-Plus's image
    encoder in miniature (its condition is hidden_states[-2]: 17 x 48 here, 257 x 1280 real)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    clip_image_processor_class()(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


CLIP_TEXT_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def save_tiny_sd_text(sd_dir: str, width: int = 24, max_length: int = 77, seed: int = 2) -> str:
    """SD 1.5's text side in its diffusers layout (``text_encoder/`` CLIPTextModel,
    ``tokenizer/`` CLIPTokenizer), random and tiny; the BPE vocabulary is written by hand
    (single characters, no merges), so no tokenizer file is downloaded."""
    import json
    import os
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    tok_dir = os.path.join(sd_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    pieces = list(CLIP_TEXT_SYMBOLS) + [c + "</w>" for c in CLIP_TEXT_SYMBOLS] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tok_dir, "vocab.json"), "w") as fh:
        json.dump({p: i for i, p in enumerate(pieces)}, fh)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(tok_dir)
    cfg = CLIPTextConfig(vocab_size=len(pieces), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length,
                         bos_token_id=len(pieces) - 2, eos_token_id=len(pieces) - 1, pad_token_id=len(pieces) - 1)
    CLIPTextModel(cfg).save_pretrained(os.path.join(sd_dir, "text_encoder"))
    return sd_dir


def save_tiny_sd(sd_dir: str, image_size: int = 32, text_width: int = 24, seed: int = 3) -> str:
    """A whole SD 1.5-shaped pipeline in the diffusers layout (``model_index.json``, ``unet/``,
    ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``), random and tiny: the VAE
    halves the image, the UNet cross-attends to text_width-wide prompt embeddings."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    import os
    save_tiny_sd_text(sd_dir, width=text_width)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_width,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=image_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(os.path.join(sd_dir, "text_encoder")),
                                   tokenizer=CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer")),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(sd_dir)
    return sd_dir


def _ip_plus_original_names(sd):
    """diffusers' IPAdapterPlusImageProjection state dict -> the names of the released
    IP-Adapter-Plus files (the inverse of diffusers' conversion on load)."""
    import re
    import torch
    out = {}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.(.*)", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        if rest.startswith("attn.to_k"):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([sd[f"layers.{i}.attn.to_k.weight"],
                                                          sd[f"layers.{i}.attn.to_v.weight"]])
            continue
        if rest.startswith("attn.to_v"):
            continue
        rest = (rest.replace("ln0", "0.norm1").replace("ln1", "0.norm2").replace("attn.to_out.0", "0.to_out")
                .replace("attn.to_q", "0.to_q").replace("ff.1.net.0.proj", "1.1").replace("ff.1.net.2", "1.3")
                .replace("ff.0", "1.0"))
        out[f"layers.{i}.{rest}"] = value
    return out


def save_tiny_ip_adapter(ip_dir: str, sd_dir: str, weight_name: str = "ip-adapter-plus_sd15.safetensors",
                         image_size: int = 32, num_queries: int = 4, seed: int = 4) -> str:
    """IP-Adapter-Plus for the tiny SD of `sd_dir`, in the released layout: ``image_encoder/``
    (the ViT-H stand-in) and the weights file — ``.bin`` (torch.save of {"image_proj": ...,
    "ip_adapter": ...}) or flat ``.safetensors`` ("image_proj.*", "ip_adapter.*"), the two
    layouts diffusers' load_ip_adapter accepts."""
    import os
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig
    encoder_dir = os.path.join(ip_dir, "image_encoder")
    if not os.path.isdir(encoder_dir):
        save_tiny_ip_image_encoder(encoder_dir, image_size=image_size)
    enc_width = CLIPVisionConfig.from_pretrained(encoder_dir).hidden_size
    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd_dir, "unet"))
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    proj = IPAdapterPlusImageProjection(embed_dims=enc_width, output_dims=cross, hidden_dims=64, depth=4, dim_head=64,
                                        heads=1, num_queries=num_queries)
    image_proj = _ip_plus_original_names(proj.state_dict())
    ip_adapter, key_id = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:   # the order diffusers numbers the adapter's layers in
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key_id}.{kind}.weight"] = torch.randn(hidden, cross) * 0.02
        key_id += 2
    path = os.path.join(ip_dir, weight_name)
    if weight_name.endswith(".safetensors"):
        from safetensors.torch import save_file
        flat = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in ip_adapter.items()})
        save_file(flat, path)
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    return ip_dir

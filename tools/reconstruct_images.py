"""Turn images, or raw visual embeddings, back into pixels through the trained stage-1 parts:
images -> image tokenizer -> x_v [N, d] -> image detokenizer -> (z_v, z_t) -> SD 1.5 +
IP-Adapter-Plus (diffusers) -> PNG.

    # reconstructions of images, in the three decoding modes
    python tools/reconstruct_images.py --export out/stage1 --images a.jpg b.png --mode all --output recon/
    # visual embeddings a VL-GPT generated (gen.images of VLGPTForCausalLM.generate, saved with torch.save)
    python tools/reconstruct_images.py --export out/stage1 --embeddings gen_images.pt --output recon/

Modes: both (z_v and z_t, the default), image (z_v only), text (z_t only), all (each of them).
The SD and IP-Adapter directories are those the detokenizer was trained with (recorded in it);
--sd-model / --ip-adapter name others. Writes <output>/<name>_<mode>.png.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="tools/export_tokenizer.py output (image_tokenizer/ + image_detokenizer/)")
    p.add_argument("--image-tokenizer", help="image_tokenizer/ directory (default: EXPORT/image_tokenizer)")
    p.add_argument("--image-detokenizer", help="image_detokenizer/ directory (default: EXPORT/image_detokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files to reconstruct")
    src.add_argument("--embeddings", help="a torch.save'd tensor [N, d] or [k, N, d], or a list of [N, d]")
    p.add_argument("--mode", default="both", choices=["both", "image", "text", "all"])
    p.add_argument("--output", required=True, help="directory for the PNGs")
    p.add_argument("--sd-model", help="SD 1.5 directory (default: the one the detokenizer records)")
    p.add_argument("--ip-adapter", help="IP-Adapter-Plus directory (default: recorded)")
    p.add_argument("--ip-adapter-weight", help="its weights file name (default: recorded)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (1 turns it off)")
    p.add_argument("--height", type=int, help="default: the UNet's sample size x the VAE's scale")
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return p


def load_embeddings(path: str) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, (list, tuple)):
        obj = torch.stack([torch.as_tensor(t) for t in obj])
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        raise ValueError(f"{path}: expected a tensor [N, d] or [k, N, d] (or a list of [N, d])")
    return obj if obj.dim() == 3 else obj.unsqueeze(0)


def main(argv=None):
    from PIL import Image
    from megatron_vl.model.image_detokenizer import ImageDetokenizer
    from megatron_vl.model.image_tokenizer import ImageTokenizer, load_image_processor
    from megatron_vl.stage1.decode import MODES, DiffusionDecoder
    args = build_parser().parse_args(argv)
    tok_dir = args.image_tokenizer or (args.export and os.path.join(args.export, "image_tokenizer"))
    detok_dir = args.image_detokenizer or (args.export and os.path.join(args.export, "image_detokenizer"))
    if not detok_dir or (args.images and not tok_dir):
        print("error: name --export (or --image-detokenizer, and --image-tokenizer for --images)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    try:
        decoder = DiffusionDecoder(ImageDetokenizer.from_pretrained(detok_dir), args.sd_model, args.ip_adapter,
                                   args.ip_adapter_weight, args.device, dtype)
        if args.images:
            tokenizer = ImageTokenizer.from_pretrained(tok_dir).to(args.device).eval()
            processor = load_image_processor(tok_dir)
            images = []
            for path in args.images:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(args.device)
            with torch.no_grad():
                embeds = tokenizer(pixels)
            names = [os.path.splitext(os.path.basename(p))[0] for p in args.images]
        else:
            embeds = load_embeddings(args.embeddings)
            stem = os.path.splitext(os.path.basename(args.embeddings))[0]
            names = [f"{stem}_{i}" for i in range(embeds.shape[0])]
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    modes = MODES if args.mode == "all" else (args.mode,)
    for mode in modes:
        out = decoder.decode(embeds, mode, args.height, args.width, args.steps, args.guidance_scale, args.seed)
        for name, image in zip(names, out):
            path = os.path.join(args.output, f"{name}_{mode}.png")
            image.save(path)
            print(f"wrote {path} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

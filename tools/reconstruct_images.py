"""Turn images, or raw visual embeddings, back into pixels through the trained stage-1 parts:
images -> image tokenizer -> x_v [N, d] -> image detokenizer -> (z_v, z_t) -> SD 1.5 +
IP-Adapter-Plus (diffusers) -> PNG.

    # reconstructions of images, in the three decoding modes
    python tools/reconstruct_images.py --export out/stage1 --images a.jpg b.png --mode all --output recon/
    # visual embeddings a VL-GPT generated (gen.images of VLGPTForCausalLM.generate, saved with torch.save)
    python tools/reconstruct_images.py --export out/stage1 --embeddings gen_images.pt --output recon/

Modes: both (z_v and z_t, the default), image (z_v only), text (z_t only), all (each of them).
The SD and IP-Adapter directories are those the detokenizer was trained with (recorded in it);
--sd-model / --ip-adapter name others. Writes <output>/<name>_<mode>.png (two inputs with the
same file name get <name>_<k>_<mode>.png); a PNG already there is refused unless --overwrite.
"""

import argparse
import os
import sys

import torch


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
    p.add_argument("--overwrite", action="store_true", help="replace PNGs of the same names already in --output "
                   "(refused otherwise)")
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


def load_embeddings(path: str, shape=None) -> torch.Tensor:
    """[k, N, d] float from a torch.save'd file; `shape` (N, d) the tokenizer's, when known.
    Anything else (garbage, another object, other sizes, NaN/inf) is an InputError naming it."""
    from megatron_vl.errors import InputError
    if not os.path.isfile(path):
        raise InputError(f"--embeddings {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # unpickling errors of every kind: not a torch.save'd tensor
        raise InputError(f"--embeddings {path}: not a torch.save'd tensor ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    try:
        if isinstance(obj, (list, tuple)):
            obj = torch.stack([torch.as_tensor(t) for t in obj])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"--embeddings {path}: a list whose items are not tensors of one shape ({exc})") from None
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        raise InputError(f"--embeddings {path}: expected a tensor [N, d] or [k, N, d] (or a list of [N, d])")
    obj = obj if obj.dim() == 3 else obj.unsqueeze(0)
    if not obj.is_floating_point():
        raise InputError(f"--embeddings {path}: dtype {obj.dtype}, expected floating point")
    if shape is not None and any(want is not None and got != want for got, want in zip(obj.shape[1:], shape)):
        n, d = ("N" if w is None else w for w in shape)
        raise InputError(f"--embeddings {path}: shaped {list(obj.shape)}, the export reads [k, N={n}, d={d}] "
                         "(N visual embeddings of width d per image)")
    obj = obj.float()
    bad = (~torch.isfinite(obj)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"--embeddings {path}: embedding(s) {bad[:5]} hold NaN or infinite values")
    if obj.shape[0] == 0:
        raise InputError(f"--embeddings {path}: holds no embedding")
    return obj


def output_names(paths):
    """One output stem per input image: its file name, or name_k when two inputs share it."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = {s: stems.count(s) for s in stems}
    seen: dict = {}
    names = []
    for stem in stems:
        if counts[stem] > 1:
            seen[stem] = seen.get(stem, 0) + 1
            names.append(f"{stem}_{seen[stem]}")
        else:
            names.append(stem)
    taken = set()
    for i, name in enumerate(names):   # "a_1" of a duplicate may also be another input's own name
        while name in taken or (counts.get(name, 0) and name != stems[i]):
            name += "_"
        names[i] = name
        taken.add(name)
    return names


def embedding_tokens(tok_dir) -> int:
    """N of the export's image tokenizer (0 when there is none to ask: then any N decodes)."""
    from megatron_vl.model.directory import read_part_config
    from megatron_vl.model.image_tokenizer import CONFIG_NAME, ImageTokenizerConfig
    if not tok_dir or not os.path.isfile(os.path.join(tok_dir, CONFIG_NAME)):
        return 0
    return read_part_config(tok_dir, CONFIG_NAME, ImageTokenizerConfig, "image tokenizer").num_tokens


def main(argv=None):
    from megatron_vl.atomic import atomic_open, guard_output
    from megatron_vl.errors import InputError, UserError
    from megatron_vl.model.directory import open_image
    from megatron_vl.model.image_detokenizer import ImageDetokenizer
    from megatron_vl.model.image_tokenizer import ImageTokenizer, load_image_processor
    from megatron_vl.inference.diffusion_decoder import DiffusionDecoder, MODES
    args = build_parser().parse_args(argv)
    tok_dir = args.image_tokenizer or (args.export and os.path.join(args.export, "image_tokenizer"))
    detok_dir = args.image_detokenizer or (args.export and os.path.join(args.export, "image_detokenizer"))
    if not detok_dir or (args.images and not tok_dir):
        print("error: name --export (or --image-detokenizer, and --image-tokenizer for --images)", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps {args.steps}: must be at least 1", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    modes = MODES if args.mode == "all" else (args.mode,)
    try:
        # Everything that can be checked without the diffusion models comes first.
        detokenizer = ImageDetokenizer.from_pretrained(detok_dir)
        if args.images:
            images = [open_image(path) for path in args.images]
            names = output_names(args.images)
        else:
            embeds = load_embeddings(args.embeddings, (embedding_tokens(tok_dir) or None, detokenizer.cfg.embed_dim))
            stem = os.path.splitext(os.path.basename(args.embeddings))[0]
            names = [f"{stem}_{i}" for i in range(embeds.shape[0])]
        inputs = list(args.images or [args.embeddings])
        for mode in modes:
            for name in names:
                guard_output(os.path.join(args.output, f"{name}_{mode}.png"), inputs=inputs,
                             overwrite=args.overwrite)
        if args.images:
            tokenizer = ImageTokenizer.from_pretrained(tok_dir).to(args.device).eval()
            if tokenizer.cfg.embed_dim != detokenizer.cfg.embed_dim:
                raise InputError(f"{tok_dir} gives visual embeddings of width {tokenizer.cfg.embed_dim}, {detok_dir} "
                                 f"reads width {detokenizer.cfg.embed_dim}: not parts of one stage-1 export")
            processor = load_image_processor(tok_dir)
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(args.device)
            with torch.no_grad():
                embeds = tokenizer(pixels)
        decoder = DiffusionDecoder(detokenizer, args.sd_model, args.ip_adapter, args.ip_adapter_weight,
                                   args.device, dtype)
    except UserError:
        raise   # one line naming the file, from run_cli
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    for mode in modes:
        out = decoder.decode(embeds, mode, args.height, args.width, args.steps, args.guidance_scale, args.seed)
        for name, image in zip(names, out):
            path = os.path.join(args.output, f"{name}_{mode}.png")
            with atomic_open(path, "wb") as fh:
                image.save(fh, format="PNG")
            print(f"wrote {path} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    from megatron_vl.errors import run_cli
    sys.exit(run_cli(main))

r"""Generate from an exported VL-GPT: prompts mixing text and images in, text and images out.

    # text (greedy), from the quickstart's export
    python tools/generate.py --hf-dir vlgpt-hf --prompt "The picture shows a red" --max-new-tokens 24
    # an image + a question -> text: each <image> in a prompt takes the next --image file
    python tools/generate.py --hf-dir vlgpt-hf --prompt "<image>Question: what color is the circle? Short answer:" \
        --image photo.jpg --stop "\n"
    # text -> image: [IMG] forced after the prompt; PNGs through the export's image detokenizer + SD 1.5
    python tools/generate.py --hf-dir vlgpt-hf --prompt "A photo of a red circle" --text-to-image --image-out out/
    # sampling, several prompts in one left-padded batch, JSON lines out
    python tools/generate.py --hf-dir vlgpt-hf --prompt "a" --prompt "the picture shows" --temperature 0.8 \
        --top-p 0.9 --top-k 50 --seed 1 --json

Images the model generates are written as PNGs (out/<prompt#>_<image#>.png) with --image-out;
that needs an export made with --image-detokenizer (and the SD / IP-Adapter directories it
names). A directory that is not a VL-GPT export (a plain LLaMA) is continued as text with
transformers' own generate.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="export-hf output (or any LlamaForCausalLM directory)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts; <image> marks images")
    p.add_argument("--image", action="append", default=[], help="image files, taken in order by the <image> tags")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sample", action="store_true", help="sample at temperature 1 (same as --temperature 1)")
    p.add_argument("--stop", action="append", default=[], help="stop strings (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-to-image", action="store_true", help="force [IMG] after each prompt, stop after the image")
    p.add_argument("--text-only", action="store_true", help="never generate an image ([IMG]/[/IMG] suppressed)")
    p.add_argument("--image-out", help="directory for the PNGs of generated images")
    p.add_argument("--decode-mode", default="both", choices=["both", "image", "text"])
    p.add_argument("--diffusion-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per left-padded batch")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start the prompt with the tokenizer's BOS (--no-add-bos: as pretrain data, "
                        "which preprocess_data.py writes without one)")
    p.add_argument("--allow-image-tokens", action="store_true",
                   help="plain LLaMA directories: let [IMG]/[/IMG] be generated (suppressed by default)")
    return p


def plain_lm(args):
    import torch
    from transformers import AutoTokenizer
    from megatron_vl.modeling_vlgpt import load_language_model
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    model = load_language_model(args.hf_dir).eval()
    image_ids = [i for i in tok.convert_tokens_to_ids(["[IMG]", "[/IMG]"]) if i is not None and i != tok.unk_token_id]
    suppress = None if args.allow_image_tokens or not image_ids else image_ids
    for prompt in args.prompt:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=args.add_bos)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tok.eos_token_id, suppress_tokens=suppress)
        print(f"prompt: {prompt!r}\n  -> {tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=False)!r}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from megatron_vl.convert.vlgpt_export import VLGPT_CONFIG
    if not os.path.isfile(os.path.join(args.hf_dir, VLGPT_CONFIG)):
        return plain_lm(args)
    import torch
    from PIL import Image
    from megatron_vl.generation import IMAGE_TAG, Generator, Sampling
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tags = sum(p.count(IMAGE_TAG) for p in args.prompt)
    if tags != len(args.image):
        print(f"error: the prompts hold {tags} {IMAGE_TAG} tag(s), {len(args.image)} --image file(s) were given",
              file=sys.stderr)
        return 2
    try:
        gen = Generator(args.hf_dir, device, add_bos=args.add_bos)
        files = iter(args.image)
        prompts = []
        for text in args.prompt:
            images = []
            for _ in range(text.count(IMAGE_TAG)):
                with Image.open(next(files)) as im:
                    images.append(im.convert("RGB"))
            prompts.append(gen.prompt(text, images))
        decoder = gen.decoder() if args.image_out else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sampling = Sampling(args.max_new_tokens, args.temperature or (1.0 if args.sample else 0.0), args.top_k,
                        args.top_p, tuple(s.encode().decode("unicode_escape") for s in args.stop), args.seed,
                        args.text_to_image, args.text_only)
    results = []
    for start in range(0, len(prompts), args.batch_size):
        results += gen.generate(prompts[start:start + args.batch_size], sampling)
    for i, (text, result) in enumerate(zip(args.prompt, results)):
        paths = []
        if decoder is not None and result.images:
            os.makedirs(args.image_out, exist_ok=True)
            pictures = decoder.decode(torch.stack(result.images), args.decode_mode, args.height, args.width,
                                      args.diffusion_steps, args.guidance_scale, args.seed)
            for j, picture in enumerate(pictures):
                paths.append(os.path.join(args.image_out, f"{i:03d}_{j}.png"))
                picture.save(paths[-1])
        cut = "" if result.partial is None else f"an image cut short after {len(result.partial)} of its " \
            f"{gen.model.config['num_image_tokens']} embeddings (--max-new-tokens)"
        if args.json:
            print(json.dumps({"prompt": text, "text": result.text, "images": paths, "num_images": len(result.images),
                              "stopped_by": result.stopped_by, "note": cut}), flush=True)
        else:
            print(f"prompt: {text!r}\n  -> {result.text!r}" + "".join(f"\n  image: {p}" for p in paths)
                  + (f"\n  note: {cut}, not decoded" if cut else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

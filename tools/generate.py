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

--max-new-tokens counts text tokens only: an image the model opens always gets its N embeddings
and [/IMG] (--max-new-images caps how many images; one that would not fit the model's positions
is never opened). Images the model generates are written as PNGs (out/<prompt#>_<image#>.png)
with --image-out; that needs an export made with --image-detokenizer (and the SD / IP-Adapter
directories it names). A directory that is not a VL-GPT export (a plain LLaMA) is continued as text with
transformers' own generate.
"""

import argparse
import json
import os
import sys

from megatron_vl.errors import run_cli


def arg_type(kind, test, wording: str):
    """An argparse type: `kind` parsed, then refused unless test(value); argparse names the flag
    and exits 2 ("argument --top-p: must be in (0, 1] (1: off), got 2.0")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value
    return parse


def setting_type(name: str):
    """The argparse type of the Sampling field `name` (the limits Sampling checks)."""
    from megatron_vl.inference.sampling import LIMITS
    return arg_type(*LIMITS[name])


positive_int = arg_type(int, lambda v: v >= 1, "at least 1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="export-hf output (or any LlamaForCausalLM directory)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts; <image> marks images "
                   "(text spelling [IMG], [/IMG] or </s> stays plain text)")
    p.add_argument("--image", action="append", default=[], help="image files, taken in order by the <image> tags")
    p.add_argument("--max-new-tokens", type=setting_type("max_new_tokens"), default=32,
                   help="text tokens per prompt at most; an image ([IMG] counts as one) always gets its N "
                        "embeddings and [/IMG] on top")
    p.add_argument("--max-new-images", type=arg_type(int, lambda v: v >= 0, "0 or more"), default=None,
                   help="images per prompt at most (then [IMG] is suppressed); default: no limit")
    p.add_argument("--temperature", type=setting_type("temperature"), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=setting_type("top_k"), default=0, help="0: off")
    p.add_argument("--top-p", type=setting_type("top_p"), default=1.0, help="in (0, 1]; 1: off")
    p.add_argument("--sample", action="store_true", help="sample at temperature 1 (same as --temperature 1)")
    p.add_argument("--stop", action="append", default=[], help="stop strings (repeatable)")
    p.add_argument("--seed", type=setting_type("seed"), default=0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--text-to-image", action="store_true",
                      help="force [IMG] after each prompt, stop after the image")
    mode.add_argument("--text-only", action="store_true", help="never generate an image ([IMG]/[/IMG] suppressed)")
    p.add_argument("--image-out", help="directory for the PNGs of generated images (<prompt#>_<image#>.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --image-out replace PNGs of those names that are already there (refused by default)")
    p.add_argument("--decode-mode", default="both", choices=["both", "image", "text"])
    p.add_argument("--diffusion-steps", type=positive_int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--height", type=positive_int)
    p.add_argument("--width", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per left-padded batch")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start the prompt with the tokenizer's BOS (--no-add-bos: as pretrain data, "
                        "which preprocess_data.py writes without one)")
    p.add_argument("--allow-image-tokens", action="store_true",
                   help="plain LLaMA directories: let [IMG]/[/IMG] be generated (suppressed by default)")
    return p


def check_args(args):
    """Everything about the flags that can be refused before a model loads."""
    from megatron_vl.errors import UsageError
    from megatron_vl.inference.sampling import check_text
    for i, text in enumerate(args.prompt):
        check_text(text, f"--prompt {i + 1}")
        if not text and not args.add_bos:
            raise UsageError(f"--prompt {i + 1} is empty and --no-add-bos leaves nothing to continue from: give it "
                             "some text, or drop --no-add-bos")
    for s in args.stop:
        check_text(s, "--stop")
        if not s:
            raise UsageError("--stop '' would stop at once: give a non-empty stop string")
    if args.image_out:
        guard_image_out(args)


def guard_image_out(args):
    """Refuses an --image-out that already holds a PNG this run would write (<prompt#>_*.png
    for its prompts), unless --overwrite: the names depend on how many images come out, so
    every PNG of these prompts' numbers counts."""
    import re
    from megatron_vl.atomic import guard_output_files
    from megatron_vl.errors import UsageError
    out = args.image_out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--image-out {out} is a file, not a directory")
    if not os.path.isdir(out):
        return
    ours = re.compile(r"(\d{3,})_\d+\.png")
    names = sorted(n for n in os.listdir(out)
                   if ours.fullmatch(n) and int(ours.fullmatch(n).group(1)) < len(args.prompt))
    guard_output_files(out, names, overwrite=args.overwrite, flag="--image-out")


def save_png(picture, path, args):
    """Written under a temporary name and renamed: never over an input image, never over a
    file this run did not make unless --overwrite, never half-written under its name."""
    from megatron_vl.atomic import guard_output, temp_name
    guard_output(path, inputs=args.image, overwrite=args.overwrite, flag="--image-out")
    tmp = temp_name(path)
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plain_lm(args):
    import torch
    from megatron_vl.inference.modeling_vlgpt import load_language_model, load_tokenizer
    from megatron_vl.errors import UsageError
    from megatron_vl.inference.generation import GenerationError
    images = [f for f, on in (("--image", args.image), ("--text-to-image", args.text_to_image),
                              ("--image-out", args.image_out), ("--max-new-images", args.max_new_images is not None))
              if on]
    if images:   # silently ignored before
        raise UsageError(f"--hf-dir {args.hf_dir} is a plain language model (no vlgpt_config.json): it takes no "
                         f"{', '.join(images)}")
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.hf_dir)
    model = load_language_model(args.hf_dir).eval()
    image_ids = [i for i in tok.convert_tokens_to_ids(["[IMG]", "[/IMG]"]) if i is not None and i != tok.unk_token_id]
    suppress = None if args.allow_image_tokens or not image_ids else image_ids
    temperature = args.temperature or (1.0 if args.sample else 0.0)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": args.top_k, "top_p": args.top_p} \
        if temperature > 0 else {"do_sample": False}
    stops = [s.encode().decode("unicode_escape") for s in args.stop]
    for i, prompt in enumerate(args.prompt):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=args.add_bos, split_special_tokens=True)
        if ids["input_ids"].shape[1] == 0:
            raise GenerationError(f"--prompt {i + 1} is empty after tokenization: nothing to continue from")
        limit = model.config.max_position_embeddings
        if ids["input_ids"].shape[1] > limit:
            raise GenerationError(f"--prompt {i + 1} has {ids['input_ids'].shape[1]} tokens, more than the model's "
                                  f"{limit} positions (max_position_embeddings): shorten it")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, pad_token_id=tok.eos_token_id,
                                 suppress_tokens=suppress, **sampling)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in stops:
            text = text.split(stop)[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "images": [], "num_images": 0}), flush=True)
        else:
            print(f"prompt: {prompt!r}\n  -> {text!r}", flush=True)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from megatron_vl.inference.export_layout import VLGPT_CONFIG
    from megatron_vl.errors import UsageError, UserError
    from megatron_vl.inference.modeling_vlgpt import check_model_dir
    check_args(args)
    check_model_dir(args.hf_dir)
    if not os.path.isfile(os.path.join(args.hf_dir, VLGPT_CONFIG)):
        return plain_lm(args)
    import torch
    from megatron_vl.inference.generation import GenerationError, Generator, IMAGE_TAG, Sampling
    from megatron_vl.model.directory import open_image
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tags = sum(p.count(IMAGE_TAG) for p in args.prompt)
    if tags != len(args.image):
        raise UsageError(f"the prompts hold {tags} {IMAGE_TAG} tag(s), {len(args.image)} --image file(s) were given")
    sampling = Sampling(args.max_new_tokens, args.temperature or (1.0 if args.sample else 0.0), args.top_k,
                        args.top_p, tuple(s.encode().decode("unicode_escape") for s in args.stop), args.seed,
                        args.text_to_image, args.text_only, args.max_new_images)
    try:
        gen = Generator(args.hf_dir, device, add_bos=args.add_bos)
        files = iter(args.image)
        prompts = []
        for i, text in enumerate(args.prompt):
            images = [open_image(next(files), "--image") for _ in range(text.count(IMAGE_TAG))]
            try:
                prompts.append(gen.prompt(text, images))
            except GenerationError as exc:
                raise GenerationError(f"--prompt {i + 1}: {exc}") from None
        decoder = gen.decoder() if args.image_out else None
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
                save_png(picture, paths[-1], args)
        notes = []
        if result.image_not_opened:
            notes.append(f"stopped before an image: its [IMG], {gen.model.config['num_image_tokens']} embeddings "
                         f"and [/IMG] would not fit in the model's {gen.max_positions} positions "
                         "(max_position_embeddings)")
        elif result.stopped_by == "position limit":
            notes.append(f"stopped at the model's {gen.max_positions} positions (max_position_embeddings) before "
                         "--max-new-tokens")
        if result.images and args.image_out is None:
            notes.append(f"{len(result.images)} image(s) generated, not decoded (give --image-out DIR for PNGs)")
        if args.json:
            print(json.dumps({"prompt": text, "text": result.text, "images": paths, "num_images": len(result.images),
                              "stopped_by": result.stopped_by, "note": "; ".join(notes)}), flush=True)
        else:
            print(f"prompt: {text!r}\n  -> {result.text!r}" + "".join(f"\n  image: {p}" for p in paths)
                  + "".join(f"\n  note: {n}" for n in notes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

r"""Greedy (or sampled) text continuation from an exported VL-GPT / LLaMA directory, with
plain transformers: LlamaForCausalLM + the directory's tokenizer, plus the LoRA adapter
through peft when the export holds one unmerged.

    python tools/generate.py --hf-dir vlgpt-hf --prompt "a red circle above a" --max-new-tokens 24
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="export-hf output (or any LlamaForCausalLM directory)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start the prompt with the tokenizer's BOS (--no-add-bos: as pretrain data, "
                        "which preprocess_data.py writes without one)")
    p.add_argument("--allow-image-tokens", action="store_true",
                   help="let [IMG]/[/IMG] be generated (what follows [IMG] is visual: text-only decoding "
                        "suppresses them by default)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from megatron_vl.modeling_vlgpt import load_language_model
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    model = load_language_model(args.hf_dir).eval()   # LlamaForCausalLM (+ PeftModel for OUT/adapter)
    image_ids = [i for i in tok.convert_tokens_to_ids(["[IMG]", "[/IMG]"]) if i is not None and i != tok.unk_token_id]
    suppress = None if args.allow_image_tokens or not image_ids else image_ids
    for prompt in args.prompt:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=args.add_bos)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tok.eos_token_id, suppress_tokens=suppress)
        continuation = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
        print(f"prompt: {prompt!r}\n  -> {continuation!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

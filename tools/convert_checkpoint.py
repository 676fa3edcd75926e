"""Convert between Hugging Face LLaMA directories and megatron-vl sharded checkpoints.

    python tools/convert_checkpoint.py import-hf --hf-dir /models/llama-7b --save ckpt/llama-7b-tp2 \
        --tensor-model-parallel-size 2 [--pipeline-model-parallel-size 2]
    python tools/convert_checkpoint.py export-hf --load ckpt/llama-7b-tp2 --save /models/llama-7b-export

Tensors are only split and concatenated, so import then export is bit-identical. Both
write to a temporary directory and rename it when complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vl.convert import hf  # noqa: E402


def import_hf(args):
    import json
    with open(os.path.join(args.hf_dir, "config.json")) as fh:
        cfg = hf.model_config_from_hf(json.load(fh))
    state_dict = hf.load_hf_state_dict(args.hf_dir)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    shards = hf.hf_to_shards(state_dict, cfg, tp, pp)
    hf.save_release_checkpoint(args.save, shards, cfg, tp, pp, tokenizer_dir=args.hf_dir)
    print(f"imported {args.hf_dir} -> {args.save} (TP={tp}, PP={pp}, {len(state_dict)} tensors, "
          f"vocabulary {cfg.vocab_size} padded to {cfg.padded_vocab_size(tp)})")


def export_hf(args):
    shards, cfg, tp, pp = hf.load_release_shards(args.load)
    state_dict = hf.shards_to_hf(shards, cfg, tp, pp)
    dtype = next(iter(state_dict.values())).dtype
    tokenizer = os.path.join(args.load, "tokenizer")
    hf.save_hf_directory(args.save, state_dict, hf.hf_config_from_model(cfg, dtype),
                         tokenizer_dir=tokenizer if os.path.isdir(tokenizer) else None)
    print(f"exported {args.load} (TP={tp}, PP={pp}) -> {args.save} ({len(state_dict)} tensors)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import-hf", help="HF LlamaForCausalLM directory -> sharded checkpoint")
    i.add_argument("--hf-dir", required=True)
    i.add_argument("--save", required=True)
    i.add_argument("--tensor-model-parallel-size", type=int, default=1)
    i.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    e = sub.add_parser("export-hf", help="sharded checkpoint -> HF LlamaForCausalLM directory")
    e.add_argument("--load", required=True)
    e.add_argument("--save", required=True)
    args = p.parse_args(argv)
    try:
        (import_hf if args.command == "import-hf" else export_hf)(args)
    except (hf.CheckpointError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

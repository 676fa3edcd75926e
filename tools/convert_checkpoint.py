r"""Convert between Hugging Face directories and megatron-vl checkpoints.

    # HF LLaMA -> release checkpoint (the --load of a first pretraining run)
    python tools/convert_checkpoint.py import-hf --hf-dir /models/llama-7b --save ckpt/llama-7b-tp2 \
        --tensor-model-parallel-size 2 [--pipeline-model-parallel-size 2]
    # release checkpoint -> HF LLaMA (bit-identical round trip: tensors are only split and joined)
    python tools/convert_checkpoint.py export-hf --load ckpt/llama-7b-tp2 --save /models/llama-7b-export
    # VL-GPT training checkpoint (any TP/PP, ZeRO-3 included) -> HF directory + LoRA adapter
    python tools/convert_checkpoint.py export-hf --load ckpt/vlgpt-7b --save /models/vlgpt-7b-hf \
        --image-tokenizer stage1/image_tokenizer [--image-detokenizer stage1/image_detokenizer] \
        [--merge-lora] [--ckpt-step 20000] [--dtype bf16]

A VL-GPT export loads as LlamaForCausalLM (language model; tokenizer with [IMG]/[/IMG]),
PeftModel.from_pretrained(model, OUT/adapter) (the LoRA adapter, unless --merge-lora), and
megatron_vl.inference.modeling_vlgpt.VLGPTForCausalLM.from_pretrained(OUT) (everything, visual
projection and regression head included). Output is written to a temporary directory and
renamed when complete. --save must be new, empty, or a previous output of the same kind (a
re-export replaces it); a project folder, a checkpoint or a directory holding the input is
refused with nothing deleted.
"""

import argparse
import os
import sys

import torch

from megatron_vl.checkpoint.layout import META_FILE, CheckpointError, is_release, read_json_object, read_latest
from megatron_vl.checkpoint.names import check_layout
from megatron_vl.checkpoint.output_dir import check_output_dir
from megatron_vl.checkpoint.release import hf_to_shards, load_release_shards, save_release_checkpoint, shards_to_hf
from megatron_vl.convert.hf import hf_config_from_model, load_hf_state_dict, model_config_from_hf, save_hf_directory
from megatron_vl.convert.vlgpt_export import export_vlgpt
from megatron_vl.errors import UserError, run_cli


def read_hf_config(hf_dir):
    """The model config of an HF LLaMA directory; a missing, damaged or foreign config.json is
    one line naming it."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"--hf-dir {hf_dir}: no such directory")
    raw = read_json_object(path, lambda: f"{path}: missing (not a Hugging Face model directory)")
    raw.setdefault("_name_or_path", path)
    try:
        return model_config_from_hf(raw)
    except KeyError as exc:
        raise CheckpointError(f"{path}: lacks {exc} (not a LLaMA config)") from None


def import_hf(args):
    cfg = read_hf_config(args.hf_dir)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    check_layout(cfg, tp, pp, f"--hf-dir {args.hf_dir}")   # before reading any weight
    check_output_dir(args.save, "release", (args.hf_dir,))
    state_dict = load_hf_state_dict(args.hf_dir)
    shards = hf_to_shards(state_dict, cfg, tp, pp)
    save_release_checkpoint(args.save, shards, cfg, tp, pp, tokenizer_dir=args.hf_dir, sources=(args.hf_dir,))
    print(f"imported {args.hf_dir} -> {args.save} (TP={tp}, PP={pp}, {len(state_dict)} tensors, "
          f"vocabulary {cfg.vocab_size} padded to {cfg.padded_vocab_size(tp)})")


DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_hf(args):
    if read_latest(args.load) is None and not os.path.isfile(os.path.join(args.load, META_FILE)):
        raise CheckpointError(f"{args.load}: not a megatron-vl checkpoint (no 'latest' file: neither a release "
                                 "checkpoint from import-hf nor a pretrain_vlgpt.py --save directory)")
    if not is_release(args.load):
        summary = export_vlgpt(args.load, args.save, merge_lora=args.merge_lora, image_tokenizer=args.image_tokenizer,
                               tokenizer_model=args.tokenizer_model, iteration=args.ckpt_step,
                               dtype=DTYPES[args.dtype], image_detokenizer=args.image_detokenizer)
        print(f"exported VL-GPT {args.load} (iteration {summary.iteration}) -> {args.save}: {summary.tensors} "
              f"language-model tensors, LoRA {summary.lora}, visual heads, tokenizer with [IMG]/[/IMG]"
              + (", image tokenizer" if summary.image_tokenizer else "")
              + (", image detokenizer" if args.image_detokenizer else ""))
        return
    if args.merge_lora or args.image_tokenizer or args.image_detokenizer:
        raise CheckpointError(f"{args.load} is a release (language-model) checkpoint: --merge-lora, "
                                 "--image-tokenizer and --image-detokenizer apply to VL-GPT training checkpoints")
    check_output_dir(args.save, "hf-llama", (args.load,))
    shards, cfg, tp, pp = load_release_shards(args.load)
    state_dict = shards_to_hf(shards, cfg, tp, pp)
    dtype = next(iter(state_dict.values())).dtype
    tokenizer = os.path.join(args.load, "tokenizer")
    save_hf_directory(args.save, state_dict, hf_config_from_model(cfg, dtype),
                         tokenizer_dir=tokenizer if os.path.isdir(tokenizer) else None, sources=(args.load,))
    print(f"exported {args.load} (TP={tp}, PP={pp}) -> {args.save} ({len(state_dict)} tensors)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import-hf", help="HF LlamaForCausalLM directory -> sharded checkpoint")
    i.add_argument("--hf-dir", required=True)
    i.add_argument("--save", required=True, help="output directory: new, empty, or a previous import-hf output "
                   "(then replaced atomically); anything else is refused, never deleted")
    i.add_argument("--tensor-model-parallel-size", type=int, default=1)
    i.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    e = sub.add_parser("export-hf", help="release or VL-GPT training checkpoint -> HF directory")
    e.add_argument("--load", required=True, help="checkpoint directory (holds 'latest')")
    e.add_argument("--save", required=True, help="output directory: new, empty, or a previous export of the same kind (then replaced atomically); "
                   "anything else is refused, never deleted")
    e.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapter into the weights")
    e.add_argument("--image-tokenizer", help="image tokenizer directory to ship with the export "
                   "(tools/export_tokenizer.py's image_tokenizer/)")
    e.add_argument("--image-detokenizer", help="image detokenizer directory to ship with the export, so generated "
                   "images can be decoded (tools/export_tokenizer.py's image_detokenizer/)")
    e.add_argument("--tokenizer-model", help="the training tokenizer, when it has moved since preprocessing")
    e.add_argument("--ckpt-step", type=int, help="export this iteration instead of the latest")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (auto: the run's precision, --bf16/--fp16/fp32)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        (import_hf if args.command == "import-hf" else export_hf)(args)
    except UserError:
        raise   # names its file or flag: one line from run_cli
    except (OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

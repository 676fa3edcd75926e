"""Write a randomly initialised transformers LlamaForCausalLM directory, for trying the
conversion and training pipeline without downloading weights. Architecture flags are the
training flags (defaults: the embedded tiny model).

    python tools/make_tiny_llama.py --save out/tiny-llama
    python tools/make_tiny_llama.py --save out/small --num-layers 4 --hidden-size 128 --num-query-groups 2
"""

import os
import sys

import argparse

import torch

from megatron_vl.atomic import guard_output_files
from megatron_vl.config import build_parser as config_parser, load_config
from megatron_vl.convert.hf import hf_config_from_model
from megatron_vl.errors import OutputError, UsageError, run_cli

# What save_pretrained writes (weights in one file at this size; the sharded names for larger
# models), checked before writing so a folder's own config.json is never replaced silently.
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
           "pytorch_model.bin", "pytorch_model.bin.index.json")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model files (config.json, weights) already in --save")
    return config_parser(parser=parser)  # --save (the checkpoint flag) names the output directory


def main(argv=None):
    parser = build_parser()
    cfg, ns = load_config(argv, parser=parser)
    save = cfg.checkpoint.save
    if not save:
        raise UsageError("--save DIR is required: the folder to write the model into")
    cfg.validate(world_size=1)
    if os.path.exists(save) and not os.path.isdir(save):
        raise OutputError(f"--save {save} is a file, not a folder")
    guard_output_files(save, WRITTEN, overwrite=ns.overwrite, flag="--save")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(cfg.training.seed)
    hf_cfg = hf_config_from_model(cfg.model, torch.float32)
    hf_cfg.pop("dtype")
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    model.save_pretrained(cfg.checkpoint.save)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {cfg.checkpoint.save}: LlamaForCausalLM, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"{cfg.model.num_attention_heads} heads / {cfg.model.kv_heads} kv, vocabulary {cfg.model.vocab_size}, "
          f"{n / 1e6:.2f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

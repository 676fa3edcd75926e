"""Write a randomly initialised transformers LlamaForCausalLM directory, for trying the
conversion and training pipeline without downloading weights. Architecture flags are the
training flags (defaults: the embedded tiny model).

    python tools/make_tiny_llama.py --save out/tiny-llama
    python tools/make_tiny_llama.py --save out/small --num-layers 4 --hidden-size 128 --num-query-groups 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

import torch  # noqa: E402

from megatron_vl.config import build_parser as config_parser, load_config  # noqa: E402
from megatron_vl.convert.hf import hf_config_from_model  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return config_parser(parser=parser)  # --save (the checkpoint flag) names the output directory


def main(argv=None):
    parser = build_parser()
    cfg, _ = load_config(argv, parser=parser)
    if not cfg.checkpoint.save:
        parser.error("--save DIR is required")
    cfg.validate(world_size=1)
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


if __name__ == "__main__":
    main()

"""Forward+backward step time: our LLaMA (TP=1) against transformers' LlamaForCausalLM.

Same config, same weights, same inputs; the two models run alternately so drift in machine
load hits both. Prints both medians and the ratio ours/HF (goal: <= 0.85).

    python benchmarks/bench_llama_step.py                      # hidden 512, 8 layers, seq 512, batch 4
    python benchmarks/bench_llama_step.py --layers 2 --repeats 3   # quick look
    python benchmarks/bench_llama_step.py --smoke                 # same code path, tiny sizes (the test-suite's check)
"""

import argparse
import statistics
import sys
import time

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

import torch


SMOKE = {"hidden": 64, "ffn": 176, "layers": 1, "heads": 4, "kv_heads": 2, "vocab": 256, "seq": 32, "batch": 1,
         "repeats": 1, "warmup": 0}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    add_smoke_flag(p, SMOKE)
    return p


def main(argv=None):
    p = build_parser()
    args = parse_with_smoke(p, argv, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM
    from megatron_vl.checkpoint.release import hf_to_shards
    from megatron_vl.convert.hf import model_config_from_hf
    from megatron_vl.convert.parity import load_llama
    from megatron_vl.parallel.state import ParallelState

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         vocab_size=args.vocab, max_position_embeddings=args.seq)
    hf_model = LlamaForCausalLM(hf_cfg).train()
    cfg = model_config_from_hf(hf_cfg.to_dict())
    ours = load_llama(cfg, ParallelState.single(), hf_to_shards(hf_model.state_dict(), cfg, 1, 1)[(0, 0)]).train()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100)], dim=1)

    def step_hf():
        # labels=ids: HF shifts internally, the same targets as `labels` above.
        hf_model(input_ids=ids, labels=ids).loss.backward()

    # Our training path: the chunked fused LM head, mean over target tokens as HF.
    loss_weights = (labels != -100).float() / (labels != -100).sum()

    def step_ours():
        ours(ids, labels=labels, loss_weights=loss_weights)[0].backward()

    # Same loss first (gradients are compared in tests/test_llama_hf.py): timing two different
    # computations would mean nothing.
    hf_model.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    loss_hf = hf_model(input_ids=ids, labels=ids).loss
    loss_ours = ours(ids, labels=labels, loss_weights=loss_weights)[0]
    print(f"losses: HF {loss_hf.item():.6f}  ours {loss_ours.item():.6f}")
    if abs(loss_hf.item() - loss_ours.item()) > 1e-4:
        sys.exit("the two models disagree: not benchmarking different computations")

    times = {"hf": [], "ours": []}
    steps = {"hf": step_hf, "ours": step_ours}
    models = {"hf": hf_model, "ours": ours}
    for i in range(args.warmup + args.repeats):
        for name in (("hf", "ours") if i % 2 == 0 else ("ours", "hf")):
            models[name].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(elapsed)
    hf_med, ours_med = statistics.median(times["hf"]), statistics.median(times["ours"])
    tokens = args.batch * args.seq
    print(f"config: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, {args.repeats} timed steps each")
    print(f"HF transformers : median {hf_med * 1000:8.1f} ms/step ({tokens / hf_med:8.0f} tokens/s)")
    print(f"megatron-vl     : median {ours_med * 1000:8.1f} ms/step ({tokens / ours_med:8.0f} tokens/s)")
    default = not args.smoke and all(getattr(args, k) == p.get_default(k) for k in
                  ("hidden", "ffn", "layers", "heads", "kv_heads", "vocab", "seq", "batch"))
    goal = "goal <= 0.85" if default else "the goal <= 0.85 is set for the default config"
    print(f"ratio ours/HF   : {ours_med / hf_med:.3f} ({goal})")


if __name__ == "__main__":
    main()

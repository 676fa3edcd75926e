"""Training-step time: our engine (DeepSpeed ZeRO-1 through the pretraining loop's
train_step: loss components, finiteness check, skip accounting, LR schedule) against a bare
torch loop (forward, backward, clip, AdamW, schedule) on the same VL-GPT, same weights, same
batches. One process; the two alternate so machine-load drift hits both. Prints both medians
and the overhead ratio engine/bare.

    python benchmarks/bench_pretrain_step.py                     # hidden 256, 4 layers, seq 512, batch 4
    python benchmarks/bench_pretrain_step.py --layers 2 --repeats 5
    python benchmarks/bench_pretrain_step.py --zero-stage 3 --lora-rank 16
    python benchmarks/bench_pretrain_step.py --smoke     # same code path, tiny sizes (the test-suite's check)
"""

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

import torch


SMOKE = {"hidden": 64, "layers": 1, "seq": 64, "batch": 1, "vocab": 256, "repeats": 1, "warmup": 0}


def synthetic_batches(cfg, n, seed=0):
    """Packed-sample-shaped batches: one image block of N visual positions per sample."""
    from megatron_vl.model.vlgpt import regression_targets
    g = torch.Generator().manual_seed(seed)
    b, s, d, n_img = cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.visual_embed_dim, 32
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=g)
        mask = torch.zeros(b, s, dtype=torch.bool)
        mask[:, 10:10 + n_img] = True
        visual = torch.randn(b, s, d, generator=g) * mask.unsqueeze(-1)
        labels = torch.cat([tokens[:, 1:], torch.full((b, 1), -100)], 1).masked_fill(
            torch.cat([mask[:, 1:], torch.zeros(b, 1, dtype=torch.bool)], 1), -100)
        out.append({"tokens": tokens.masked_fill(mask, 0), "visual_embeds": visual, "visual_mask": mask,
                    "position_ids": None, "segment_ids": None, "labels": labels,
                    "visual_targets": regression_targets(visual),
                    "regression_mask": torch.cat([mask[:, 1:], torch.zeros(b, 1, dtype=torch.bool)], 1)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)

    from megatron_vl.config import load_config
    from megatron_vl.parallel.random import seed_everything
    from megatron_vl.parallel.state import ParallelState, init_distributed
    from megatron_vl.training.build import build_model, initialize_engine
    from megatron_vl.training.optim import build_optimizer, build_scheduler
    from megatron_vl.training.pretrain import VLGPTTrainer, parser

    torch.set_flush_denormal(True)
    cfg, _ = load_config([
        "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.hidden * 11 // 4 // 8 * 8),
        "--num-layers", str(args.layers), "--num-attention-heads", str(max(args.hidden // 64, 1)),
        "--seq-length", str(args.seq), "--vocab-size", str(args.vocab), "--micro-batch-size", str(args.batch),
        "--zero-stage", str(args.zero_stage), "--lora-rank", str(args.lora_rank), "--clip-grad", "1.0",
        "--train-iters", "1000"], parser=parser())
    init_distributed("gloo", single_process_group=True)
    state = ParallelState.build(1, 1)
    tracker = seed_everything(cfg.training.seed)
    built = build_model(cfg, state, tracker, [args.vocab - 2, args.vocab - 1], log=lambda m: None)
    bare_model = copy.deepcopy(built.module)
    engine, _ = initialize_engine(cfg, state, built, 1)
    trainer = VLGPTTrainer(cfg, state, engine, built, SimpleNamespace(global_batch=args.batch, train=None, valid=None),
                      tracker, torch.device("cpu"), 1)
    bare_opt = build_optimizer(bare_model, cfg.optimizer, zero_stage=1)
    bare_sched = build_scheduler(bare_opt, cfg.optimizer, cfg.training.train_iters)
    params = [q for q in bare_model.parameters() if q.requires_grad]

    def bare_step(batch):
        total, _, _ = bare_model(batch)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.clip_grad)
        bare_opt.step()
        bare_sched.step()
        bare_opt.zero_grad(set_to_none=True)

    batches = synthetic_batches(cfg, args.warmup + args.repeats)
    times = {"bare": [], "engine": []}
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        bare_step(batch)
        t1 = time.perf_counter()
        trainer.train_step(iter([batch]))
        t2 = time.perf_counter()
        if i >= args.warmup:
            times["bare"].append(t1 - t0)
            times["engine"].append(t2 - t1)
    bare, ours = statistics.median(times["bare"]), statistics.median(times["engine"])
    n = sum(q.numel() for q in bare_model.parameters())
    print(f"VL-GPT {n / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers, seq {args.seq}, "
          f"batch {args.batch}, ZeRO-{args.zero_stage}, LoRA rank {args.lora_rank}, {torch.get_num_threads()} threads")
    print(f"bare torch loop:                 {bare * 1000:8.1f} ms/step (median of {args.repeats})")
    print(f"megatron-vl engine (DeepSpeed):  {ours * 1000:8.1f} ms/step")
    print(f"overhead ratio engine/bare:      {ours / bare:8.3f}")


if __name__ == "__main__":
    main()

"""Peak host memory per rank while the model is built, 4 ranks on CPU/gloo: ZeRO-3 (built
partitioned, training/partitioned.py) against ZeRO-1 (every rank holds the whole model, as
ZeRO-3 did before), in one run. Goal: a ZeRO-3 rank's build costs <= 1/4 of the fp32 model
plus a fixed overhead: the largest single tensor twice (generated whole, then cut; here the
vocabulary table) and the largest module's TP slice (built whole before zero.Init
partitions it).

    python benchmarks/bench_build_memory.py [--hidden 1024 --layers 8 --ffn 2816 --vocab 32002]
    python benchmarks/bench_build_memory.py --smoke     # same code path, tiny sizes (the test-suite's check)

"Build" = peak RSS after build_model minus RSS before it (imports, process group, DeepSpeed
communication up). The engine (optimizer states, ZeRO buffers) comes after and is reported
apart: with ZeRO-3 it holds per rank another copy of the partition (fp32 master) plus two
Adam moments once the first step runs.
"""

import argparse
import os

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

from megatron_vl.testing.plan_measure import peak_bytes, rss_bytes
from megatron_vl.testing.distributed import run_distributed

MB = 1024 * 1024
SMOKE = {"hidden": 64, "layers": 1, "ffn": 176, "vocab": 256, "ranks": 1}


def _rss_mb() -> float:
    return rss_bytes() / MB


def _peak_mb() -> float:
    return peak_bytes() / MB


def _rank(rank, world, argv):
    import deepspeed
    import torch
    from megatron_vl.config import load_config
    from megatron_vl.parallel.random import seed_everything
    from megatron_vl.parallel.state import ParallelState
    from megatron_vl.training.build import build_model, initialize_engine
    cfg, _ = load_config(argv)
    deepspeed.init_distributed(dist_init_required=False)
    state = ParallelState.build(1, 1)
    tracker = seed_everything(cfg.training.seed, state.tp_rank, state.pp_rank, "cpu")
    torch.distributed.barrier()
    before = _rss_mb()
    # ru_maxrss never goes down: the build's peak is only visible if it exceeds what the
    # process already reached, so touch nothing big before it.
    start_peak = _peak_mb()
    built = build_model(cfg, state, tracker, [cfg.model.vocab_size - 2, cfg.model.vocab_size - 1], log=lambda m: None)
    build_peak = _peak_mb()
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in built.module.parameters())
    largest = max(getattr(p, "ds_numel", p.numel()) for p in built.module.parameters())
    initialize_engine(cfg, state, built, world)
    engine_rss = _rss_mb()
    return {"before": before, "start_peak": start_peak, "build_peak": build_peak, "engine": engine_rss,
            "numel": numel, "largest": largest}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32002)
    p.add_argument("--ranks", type=int, default=4)
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_vl_torch_extensions"))
    model = ["--hidden-size", args.hidden, "--num-layers", args.layers, "--num-attention-heads", 8,
             "--ffn-hidden-size", args.ffn, "--vocab-size", args.vocab, "--seq-length", 64,
             "--visual-embed-dim", 64, "--micro-batch-size", 1, "--global-batch-size", args.ranks,
             "--train-iters", 1]
    results = {}
    for zero in (1, 3):
        argv = [str(a) for a in model + ["--zero-stage", zero]]
        results[zero] = run_distributed(_rank, args.ranks, argv, timeout=900)
    numel = results[1][0]["numel"]
    largest = results[1][0]["largest"]
    model_mb = numel * 4 / MB
    overhead_mb = (2 * largest * 4 + (4 * args.hidden * args.hidden + 3 * args.hidden * args.ffn) * 4) / MB
    print(f"model: {numel:,} parameters = {model_mb:.0f} MB fp32; largest tensor {largest * 4 / MB:.0f} MB; "
          f"{args.ranks} ranks")
    print("ZeRO | rank | RSS before build | build peak - before | after engine init")
    for zero in (1, 3):
        for r, res in enumerate(results[zero]):
            print(f"  {zero}  |  {r}   | {res['before']:8.0f} MB | {res['build_peak'] - res['before']:8.0f} MB "
                  f"| {res['engine']:8.0f} MB")
    worst3 = max(res["build_peak"] - res["before"] for res in results[3])
    worst1 = max(res["build_peak"] - res["before"] for res in results[1])
    bound = model_mb / args.ranks + overhead_mb
    print(f"ZeRO-3 build, worst rank: {worst3:.0f} MB = {worst3 / model_mb:.2f} x the fp32 model "
          f"(ZeRO-1: {worst1:.0f} MB = {worst1 / model_mb:.2f} x); bound 1/{args.ranks} model + overhead "
          f"(2 x largest tensor + one decoder layer) = {model_mb / args.ranks:.0f} + {overhead_mb:.0f} = {bound:.0f} MB: "
          f"{'within' if worst3 <= bound else 'OVER'}")


if __name__ == "__main__":
    main()

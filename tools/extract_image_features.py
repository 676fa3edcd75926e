r"""Run the frozen image tokenizer over a preprocessed dataset's image table and write its
feature store (float16 [N, d] per image): the visual inputs and regression targets of
pretraining. Resumable: shards already written (from the same data) are skipped on a rerun,
with any number of ranks. An image that does not decode is reported with its table row and
document, and the run goes on: the store records it and training drops that image's block.

One process, or every rank of a launch (torchrun, deepspeed, srun, mpirun): each rank computes
its share of the shards, rank 0 merges the store. Images are decoded and preprocessed in
DataLoader workers (--workers) while the rank's device runs the forward; the store is
byte-identical whatever the rank and worker counts (same --batch-size and --shard-size).

    python tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --image-tokenizer ckpt/image_tokenizer --batch-size 256
    # 4 nodes x 8 GPUs (or: deepspeed --hostfile hosts tools/extract_image_features.py ...)
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
        tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --image-tokenizer ckpt/image_tokenizer --batch-size 256 --workers 8
    srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --kill-on-bad-exit=1 \
        python tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --image-tokenizer ckpt/image_tokenizer --batch-size 256 --workers 8
    # before stage-1 training exists: an untrained tokenizer on a CLIP directory
    python tools/extract_image_features.py --data-prefix data/mmc4_text_document \
        --init-from-clip /models/clip-vit-large-patch14 --num-image-tokens 32 --embed-dim 4096 \
        --save-image-tokenizer ckpt/image_tokenizer_untrained
"""

import argparse
import sys

import torch


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", nargs="+", required=True, help="dataset prefixes (…_text_document)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-tokenizer", help="a saved image tokenizer directory")
    src.add_argument("--init-from-clip", help="CLIP vision directory: build an untrained tokenizer on it")
    p.add_argument("--num-image-tokens", type=int, default=32, help="N (with --init-from-clip)")
    p.add_argument("--embed-dim", type=int, default=4096, help="d (with --init-from-clip)")
    p.add_argument("--tokenizer-layers", type=int, default=2, help="causal transformer depth (with --init-from-clip)")
    p.add_argument("--tokenizer-heads", type=int, default=8, help="its attention heads (with --init-from-clip)")
    p.add_argument("--save-image-tokenizer", help="save the tokenizer used here (with --init-from-clip)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward, counted from each shard's first row (a rerun that resumes keeps it: "
                        "a batch's numerics depend on its images)")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="images per resumable shard (fixed table rows; a rerun that resumes keeps it)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers decoding and preprocessing images, per rank (0: in the rank's own "
                        "process; default: on CUDA the rank's share of the cores less one, at most 8; on CPU 1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype of the forward on CUDA (default bf16; the store is float16 either way); "
                        "CPU computes in fp32")
    p.add_argument("--device", default=None, help="default: cuda:<local rank> when CUDA is available, else cpu")
    p.add_argument("--timeout-minutes", type=float, default=10.0,
                   help="how long a rank waits for the others at the end of a round of shards before the run "
                        "fails (a dead rank); keep it well above one shard's time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    # The deepspeed launcher appends --local_rank=N; accepted and ignored (the environment's LOCAL_RANK wins).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-shards", type=int, default=None,
                   help="test hook: each rank kills itself (SIGKILL) after this many shards and one batch of the "
                        "next, as a run killed mid-way")
    return p


def main(argv=None):
    from tqdm import tqdm
    from megatron_vl.data.extraction import autocast_dtype
    from megatron_vl.data.features import extract_features
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.parallel.state import init_distributed
    import torch.distributed as dist
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("batch_size", "shard_size", "num_image_tokens", "embed_dim", "tokenizer_layers", "tokenizer_heads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive number")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers {args.workers}: must be 0 (decode in the rank's process) or more")
    if not args.timeout_minutes > 0:
        p.error(f"--timeout-minutes {args.timeout_minutes}: must be above 0")
    owns_group = not dist.is_initialized()
    # A plain `python` run is one process and makes no group; under a launcher every rank joins.
    try:
        launch = init_distributed("auto", launch=None, timeout_minutes=args.timeout_minutes)
    except RuntimeError as exc:   # the rendezvous: a rank that never came, an address not reachable
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: could not join the ranks of this launch: {lines[-1][:300]}", file=sys.stderr)
        return 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = args.device or (f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu")
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        if args.image_tokenizer:
            model = ImageTokenizer.from_pretrained(args.image_tokenizer)
            processor = load_image_processor(args.image_tokenizer)
        else:
            cfg = ImageTokenizerConfig(args.num_image_tokens, args.embed_dim, args.tokenizer_layers,
                                       args.tokenizer_heads)
            model = ImageTokenizer.from_clip(args.init_from_clip, cfg, args.seed)
            processor = load_image_processor(args.init_from_clip)
            if args.save_image_tokenizer and rank == 0:
                model.save_pretrained(args.save_image_tokenizer, processor)
        model.to(device).eval()
        if launch.world_size > 1:
            say(launch.describe(), flush=True)
        note = autocast_dtype(args.dtype, device)[1]
        if note:
            say(note, flush=True)
        for prefix in args.data_prefix:
            try:
                result = extract_features(prefix, model, processor, args.batch_size, args.shard_size, device,
                                          progress=None if args.no_progress else tqdm, dtype=args.dtype,
                                          workers=args.workers, stop_after_shards=args.stop_after_shards)
            except (ValueError, OSError) as exc:
                print(f"error: {prefix}: {exc}", file=sys.stderr)
                return 1
            say(f"{prefix}_image_features: {result.count} images x {list(result.shape)} float16 "
                f"({result.computed_shards} shards computed by {launch.world_size} rank(s), "
                f"{result.reused_shards} reused from an earlier run)")
            if result.forward_share is not None:
                # Start-up (workers, the first batch's decoding) weighs on short runs: no hint there.
                hint = "" if result.forward_share >= 0.85 or result.compute_seconds < 60 else \
                    "; decoding or reading images held it back: more --workers (or cores per rank) would help"
                say(f"forward busy {result.forward_share:.0%} of the {result.compute_seconds:.0f} s the least busy "
                    f"rank computed{hint}")
            if result.undecodable:
                say(f"skipped (image undecodable, its block dropped from training layouts): {len(result.undecodable)}")
                for line in result.undecodable[:20]:
                    say(f"  {line}")
                if len(result.undecodable) > 20:
                    say(f"  ... and {len(result.undecodable) - 20} more (all recorded in the feature store)")
        return 0
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from megatron_vl.errors import run_cli
    sys.exit(run_cli(main))

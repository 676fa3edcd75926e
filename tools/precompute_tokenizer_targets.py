"""Run stage 1's frozen target encoders once over webdataset shards and store their outputs
(float16), so training reads them (train_tokenizer.py --targets-dir) instead of running the
ViT-H image encoder and SD's text encoder every step. Equal losses either way.

    python tools/precompute_tokenizer_targets.py --train-shards 'cc3m/{00000..00331}.tar' \
        --sd-model models/stable-diffusion-v1-5 --ip-adapter models/IP-Adapter/models \
        --targets-dir targets/cc3m --batch-size 256
    # several GPUs: each process takes every WORLD_SIZE-th shard
    torchrun --nproc_per_node 8 tools/precompute_tokenizer_targets.py ...

One store per shard (about 0.78 MB per pair at SD 1.5 / ViT-H sizes: 257x1280 + 77x768
float16); a shard whose store exists and was made from the shard's current bytes (size and
blake2b hash) is skipped, so a rerun resumes; a shard that changed is computed again. A store
of format 1 (before hashes) is kept when its shard has the recorded size and is not newer than
it: its shard's hash, size and mtime are recorded in it (no recompute), with a note; so are a
shard's new mtime and same bytes (training then trusts size and mtime and need not hash it).
Pairs without caption or with an image that does not decode are counted and reported.
"""

import argparse
import os
import sys

import torch


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-shards", nargs="+", required=True,
                   help="shard patterns as train_tokenizer.py takes them (blend weights are ignored here)")
    p.add_argument("--sd-model", required=True, help="SD 1.5 directory (text_encoder/, tokenizer/)")
    p.add_argument("--ip-adapter", required=True, help="IP-Adapter-Plus directory (image_encoder/)")
    p.add_argument("--targets-dir", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    from tqdm import tqdm
    from megatron_vl.atomic import remove_stale_temps
    from megatron_vl.data.formats import Report
    from megatron_vl.data.pair_stream import parse_sources
    from megatron_vl.stage1.framework import ip_image_encoder_dir
    from megatron_vl.stage1.targets import TargetEncoders, bring_store_up_to_date, write_shard_targets
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be a positive number of pairs")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    sources, _ = parse_sources(args.train_shards)
    shards = sorted({s for source in sources for s in source})[rank::world]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        print(f"error: {len(missing)} shard(s) do not exist, e.g. {missing[0]}", file=sys.stderr)
        return 2
    os.makedirs(args.targets_dir, exist_ok=True)
    # A killed run (or a killed store upgrade) left half-written stores under temp names.
    remove_stale_temps(args.targets_dir, log=lambda msg: print(msg, flush=True))
    todo = [s for s in shards if not bring_store_up_to_date(args.targets_dir, s,
                                                            log=lambda msg: print(msg, flush=True))]
    print(f"rank {rank}: {len(shards)} shard(s), {len(shards) - len(todo)} already done", flush=True)
    encoders = TargetEncoders(ip_image_encoder_dir(args.ip_adapter), args.sd_model, device)
    report = Report()
    rows = 0
    with tqdm(total=None, unit="pair", disable=args.no_progress, desc=f"rank {rank}") as bar:
        for shard in todo:
            rows += write_shard_targets(shard, args.targets_dir, encoders, args.batch_size, report, bar)
    print(f"rank {rank}: wrote targets of {rows} pairs from {len(todo)} shard(s) to {args.targets_dir}")
    for reason, n in sorted(report.skipped.items()):
        print(f"rank {rank}: skipped ({reason}): {n}  first at {report.first_seen[reason]}")
    return 0


if __name__ == "__main__":
    from megatron_vl.errors import run_cli
    sys.exit(run_cli(main))

"""Which TP x PP x DP x ZeRO x micro-batch x recompute layouts fit a cluster, and how fast.

The model comes from the same flags (--model-preset, --config YAML) as pretrain_vlgpt.py; it
is built on the meta device to count each rank's parameters, so LoRA and the visual parts
count exactly as in training. The paper's stage-2 run (LLaMA-7B + LoRA r=32, seq 512, global
batch 4096, bf16) on 32 A100-40GB (--preset is the GPU type, --model-preset the model):

    python tools/plan_parallelism.py --preset A100-40GB --gpus 32 --model-preset vlgpt-7.5b \\
        --lora-rank 32 --lora-alpha 64 --global-batch-size 4096 --bf16

Memory is per rank (the busiest pipeline stage, at the peak moment of a step), in GiB: weights, gradients, optimizer
states (Adam moments + fp32 copy), activations at the sequence length, DeepSpeed buffers.
Step time and MFU come from FLOPs at --kernel-efficiency of peak plus the collectives over
the stated bandwidths. What it cannot know: the allocator's fragmentation and the CUDA/NCCL
context (kept out with --reserved-gib), kernel speeds of your GPUs (measure one MFU and pass
it as --kernel-efficiency; --peak-tflops overrides the preset's peak), link contention, stragglers, and the data loader.

Layout flags (--tensor-model-parallel-size, --pipeline-model-parallel-size, --zero-stage,
--micro-batch-size, --recompute-activations, and the ZeRO stage / micro-batch of a
--deepspeed_config JSON) fix that part of the layout: only it is searched, and a value that
cannot work on the cluster and model is refused with the reason (exit 2).

--corpus-images (with --corpus-documents and --max-images-per-doc) adds the feature store's
size: N x d x 2 bytes per image, for the corpus in pack mode, under the paper's rule of at
most k images per document, and the most images the run (--train-iters x global batch x
--max-images-per-sample) can read. MMC4-core (29.9M images, 7.3M documents), the paper's run:

    python tools/plan_parallelism.py --model-preset vlgpt-7.5b --global-batch-size 4096 --bf16 \\
        --train-iters 20000 --corpus-images 29900000 --corpus-documents 7300000
"""

import argparse
import sys
import time

from megatron_vl.config import ConfigError, build_parser, given_settings, load_config, user_deepspeed_json
from megatron_vl.errors import UsageError, run_cli
from megatron_vl.plan.checks import (cluster_errors, describe, given_layout, layout_errors, model_errors,
                                     no_layout_message, raise_usage)
from megatron_vl.plan.model import PRESETS, Cluster
from megatron_vl.plan.planner import plan, table
from megatron_vl.plan.storage import CorpusStorage, storage_table


def cluster_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster (the planner's own flags)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="A100-40GB",
                   help="GPU type: memory, peak bf16 TFLOP/s, NVLink and InfiniBand bandwidth per GPU")
    g.add_argument("--gpus", type=int, default=32, help="GPUs in the job")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: the preset's (8)")
    g.add_argument("--gpu-memory-gib", type=float, default=None, help="default: the preset's")
    g.add_argument("--intra-node-gbps", type=float, default=None, help="GB/s per GPU inside a node")
    g.add_argument("--inter-node-gbps", type=float, default=None, help="GB/s per GPU across nodes")
    g.add_argument("--kernel-efficiency", type=float, default=None,
                   help="fraction of peak the kernels reach (default 0.5)")
    g.add_argument("--reserved-gib", type=float, default=None,
                   help="GiB per GPU kept for CUDA context, NCCL and fragmentation (default 3)")
    g.add_argument("--top", type=int, default=20, help="rows to print")
    c = p.add_argument_group("corpus (the feature store's size)")
    c.add_argument("--corpus-images", type=int, default=None,
                   help="images in the corpus (every image of every document): print the feature store's size")
    c.add_argument("--corpus-documents", type=int, default=None,
                   help="its documents: bounds the images the paper's rule keeps (--max-images-per-doc each)")
    c.add_argument("--max-images-per-doc", type=int, default=5,
                   help="the paper's rule: images chosen per document at preprocessing (default 5)")
    return p


def corpus_storage(cfg, ns, batch: int):
    """The --corpus-* flags with the model's N and d and the run's length, or None without them."""
    if ns.corpus_images is None:
        if ns.corpus_documents is not None:
            raise UsageError(f"--corpus-documents {ns.corpus_documents} needs --corpus-images")
        return None
    for value, flag in ((ns.corpus_images, "--corpus-images"), (ns.corpus_documents, "--corpus-documents"),
                        (ns.max_images_per_doc, "--max-images-per-doc")):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    return CorpusStorage(ns.corpus_images, ns.corpus_documents, ns.max_images_per_doc, cfg.data.num_image_tokens,
                         cfg.model.visual_embed_dim, cfg.training.train_iters, batch,
                         cfg.data.max_images_per_sample)


def main(argv=None) -> int:
    parser = build_parser(parser=argparse.ArgumentParser(description=__doc__, parents=[cluster_parser()],
                                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    t0 = time.perf_counter()
    cfg, ns = load_config(argv, parser=parser)
    preset = PRESETS[ns.preset]
    changes = {k: v for k, v in (("gpus_per_node", ns.gpus_per_node), ("memory_gib", ns.gpu_memory_gib),
                                 ("peak_tflops", cfg.logging.peak_tflops), ("intra_node_gbps", ns.intra_node_gbps),
                                 ("inter_node_gbps", ns.inter_node_gbps), ("kernel_efficiency", ns.kernel_efficiency),
                                 ("reserved_gib", ns.reserved_gib)) if v is not None}
    cluster = Cluster(**{**preset.__dict__, "gpus": ns.gpus, **changes})
    # Every number in range first (a zero efficiency or GPU count divides by zero later).
    raise_usage(cluster_errors(cluster, ns.top) + model_errors(cfg, cfg.training.global_batch_size))
    batch = cfg.training.global_batch_size or cfg.training.micro_batch_size * cluster.gpus
    storage = corpus_storage(cfg, ns, batch)
    try:
        # A layout flag the user gave is searched alone, or refused with the reason: never ignored.
        fixed = given_layout(cfg, given_settings(ns), user_deepspeed_json(cfg))
        raise_usage(layout_errors(cfg, cluster, batch, fixed))
        estimates = plan(cfg, cluster, batch, fixed)
    except ConfigError as exc:   # e.g. an unreadable --deepspeed_config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not estimates:
        raise UsageError(no_layout_message(cfg, cluster, batch, fixed))
    m = cfg.model
    print(f"model: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads, FFN "
          f"{m.ffn_hidden_size}, vocab {m.vocab_size}, visual d {m.visual_embed_dim}, LoRA r={cfg.lora.lora_rank}; "
          f"seq {m.seq_length}, global batch {batch}, "
          f"{cfg.training.precision}; {ns.preset} x {cluster.gpus}"
          + (f"; only {describe(fixed)}" if fixed else ""))
    print(table(estimates, cluster, ns.top))
    if storage is not None:
        print(storage_table(storage))
    print(f"planned in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

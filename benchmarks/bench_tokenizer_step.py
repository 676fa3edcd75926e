"""Stage-1 throughput: images/s of train_tokenizer.py with targets computed on the fly (the
frozen IP-Adapter image encoder and SD text encoder run every step) against targets read
from the precomputed float16 stores, in one run, on the same models, shards and settings.
Also prints what precomputing cost once. The image encoder's size is the knob: at SD 1.5's
real ViT-H/14 it is most of a step.

    python benchmarks/bench_tokenizer_step.py                       # CPU, one process
    python benchmarks/bench_tokenizer_step.py --ip-width 512 --ip-layers 12 --iters 30
    python benchmarks/bench_tokenizer_step.py --smoke     # same code path, tiny sizes (the test-suite's check)

Each run trains --iters steps and logs every --window; the first window (start-up, first
batches) is left out and the rest's median images/s is reported.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke
from megatron_vl.testing.processes import run_script
from megatron_vl.testing.scripts import CHECKOUT as ROOT, load_script


SMOKE = {"image_size": 32, "clip_width": 32, "ip_width": 32, "ip_layers": 1, "text_width": 32, "pairs": 8,
         "micro_batch": 2, "iters": 2, "window": 1, "in_process": True}


IP_WEIGHT = "ip-adapter-plus_sd15.bin"


def make_inputs(root, args):
    import io
    import numpy as np
    import webdataset as wds
    from PIL import Image
    from megatron_vl.testing.tiny_models import save_tiny_clip, save_tiny_ip_image_encoder, save_tiny_sd_text
    save_tiny_clip(os.path.join(root, "clip"), args.image_size, args.clip_width, 2)
    save_tiny_ip_image_encoder(os.path.join(root, "ip", "image_encoder"), args.image_size, args.ip_width,
                               args.ip_layers)
    # train_tokenizer.py refuses an --ip-adapter directory without the adapter weights file,
    # which only decoding reads (not benchmarked here): a placeholder satisfies the check.
    open(os.path.join(root, "ip", IP_WEIGHT), "wb").close()
    save_tiny_sd_text(os.path.join(root, "sd"), width=args.text_width)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "shards"))
    for s in range(2):
        with wds.TarWriter(os.path.join(root, "shards", f"{s:05d}.tar")) as sink:
            for i in range(args.pairs // 2):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(
                    buf, "JPEG")
                sink.write({"__key__": f"{s}_{i:06d}", "jpg": buf.getvalue(), "txt": f"a picture number {i}"})
    return os.path.join(root, "shards", "{00000..00001}.tar")


def run_here(cmd):
    """cmd's script run in this process as a one-rank job, its stdout captured: no interpreter
    start-up or imports (seconds each), the same training code."""
    import contextlib
    import io
    from megatron_vl.testing.distributed import one_rank_job
    script, argv = cmd[1], cmd[2:]
    if script == "train_tokenizer.py":
        from megatron_vl.stage1.trainer import run as entry
    else:
        entry = load_script("tools/precompute_tokenizer_targets.py").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = one_rank_job(lambda: entry(argv))
    if code:
        sys.exit(f"{script} failed (exit code {code}):\n{out.getvalue()[-3000:]}")
    return out.getvalue()


def run(cmd, in_process=False):
    if in_process:
        return run_here(cmd)
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    proc = run_script(cmd, cwd=ROOT, env=env, timeout=None)
    if proc.returncode:
        sys.exit(f"{cmd[1]} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--clip-width", type=int, default=64)
    p.add_argument("--ip-width", type=int, default=256, help="IP-Adapter image encoder width (ViT-H: 1280)")
    p.add_argument("--ip-layers", type=int, default=8, help="its depth (ViT-H: 32)")
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--in-process", action="store_true",
                   help="run the two scripts in this process (no start-ups: then the precompute time excludes them)")
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    with tempfile.TemporaryDirectory() as root:
        shards = make_inputs(root, args)
        t0 = time.perf_counter()
        run([sys.executable, "tools/precompute_tokenizer_targets.py", "--train-shards", shards, "--sd-model",
             os.path.join(root, "sd"), "--ip-adapter", os.path.join(root, "ip"), "--targets-dir",
             os.path.join(root, "targets"), "--batch-size", str(args.micro_batch), "--no-progress"], args.in_process)
        precompute_s = time.perf_counter() - t0
        common = [sys.executable, "train_tokenizer.py", "--clip-model", os.path.join(root, "clip"),
                  "--sd-model", os.path.join(root, "sd"), "--ip-adapter", os.path.join(root, "ip"),
                  "--ip-adapter-weight", IP_WEIGHT, "--train-shards", shards, "--visual-embed-dim", "64", "--num-image-tokens", "32",
                  "--tokenizer-heads", "2", "--detokenizer-width", "64", "--detokenizer-heads", "4",
                  "--detokenizer-layers", "2", "--micro-batch-size", str(args.micro_batch), "--train-iters",
                  str(args.iters), "--log-interval", str(args.window), "--shuffle-buffer", "32"]
        rates = {}
        for name, extra in (("on the fly", []), ("precomputed", ["--targets-dir", os.path.join(root, "targets")])):
            out = run(common + extra, args.in_process)
            windows = [float(x) for x in re.findall(r"images/s: ([0-9.]+)", out)]
            rates[name] = statistics.median(windows[1:] or windows)
    print(f"stage 1, one process, {os.cpu_count()} cores visible; IP image encoder width {args.ip_width} x "
          f"{args.ip_layers} layers at {args.image_size}px; micro-batch {args.micro_batch}")
    print(f"precomputing targets of {args.pairs} pairs:     {precompute_s:8.1f} s (once, "
          f"{'in this process' if args.in_process else 'incl. start-up'})")
    print(f"targets on the fly:                  {rates['on the fly']:8.2f} images/s")
    print(f"precomputed targets:                 {rates['precomputed']:8.2f} images/s")
    print(f"speed-up precomputed / on the fly:   {rates['precomputed'] / rates['on the fly']:8.2f} x")


if __name__ == "__main__":
    main()

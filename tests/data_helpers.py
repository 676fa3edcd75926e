"""Sample corpora and datasets the data tests build themselves."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args, expect=0):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{args} exited {proc.returncode}, expected {expect}:\n{out}"
    return out


def make_tiny_clip(path):
    from megatron_vl.testing.tiny_models import save_tiny_clip
    return save_tiny_clip(path)


INPUTS = {"mmc4": ("mmc4/docs_shard_0_v2.jsonl.zip", ["--image-root", "{d}/mmc4/images"]),
          "obelics": ("obelics/part-00000.parquet", []),
          "wds-pairs": ("pairs/00000.tar", []),
          "jsonl-text": ("text.jsonl", [])}


def preprocess(sample_dir, fmt, out_prefix, *extra, expect=0):
    rel, opts = INPUTS[fmt]
    return run_tool("tools/preprocess_data.py", "--input-format", fmt, "--input", f"{sample_dir}/{rel}",
                    *[o.format(d=sample_dir) for o in opts], "--output-prefix", str(out_prefix),
                    "--tokenizer-model", f"{sample_dir}/tokenizer.model", "--append-eod", "--no-progress",
                    *extra, expect=expect)

"""Sample corpora and datasets the data tests build themselves."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args, expect=0, process=False):
    """Runs tools/X.py with these arguments and checks its exit code; returns what it printed.
    In this process by default (its main(argv), output captured, SystemExit and a crash's
    traceback as the interpreter would report them): a process costs seconds of imports and
    the data tests run ~45 tools. process=True runs a real interpreter."""
    if process:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
        code, out = proc.returncode, proc.stdout + proc.stderr
    else:
        code, out = _in_process(str(args[0]), [str(a) for a in args[1:]])
    assert code == expect, f"{args} exited {code}, expected {expect}:\n{out}"
    return out


def _in_process(script, argv):
    import contextlib
    import importlib.util
    import io
    import traceback
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location("_tool_" + os.path.basename(script)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            spec.loader.exec_module(module)
            from megatron_vl.errors import run_cli   # as `python tools/X.py` runs main: user errors are one line
            code = run_cli(module.main, argv)
        except SystemExit as exc:   # argparse and sys.exit("message"), as the interpreter maps them
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue()


def make_tiny_clip(path):
    from megatron_vl.testing.tiny_models import save_tiny_clip
    return save_tiny_clip(path)


INPUTS = {"mmc4": ("mmc4/docs_shard_0_v2.jsonl.zip", ["--image-root", "{d}/mmc4/images"]),
          "obelics": ("obelics/part-00000.parquet", []),
          "wds-pairs": ("pairs/00000.tar", []),
          "jsonl-text": ("text.jsonl", [])}


def preprocess(sample_dir, fmt, out_prefix, *extra, expect=0, process=False):
    rel, opts = INPUTS[fmt]
    return run_tool("tools/preprocess_data.py", "--input-format", fmt, "--input", f"{sample_dir}/{rel}",
                    *[o.format(d=sample_dir) for o in opts], "--output-prefix", str(out_prefix),
                    "--tokenizer-model", f"{sample_dir}/tokenizer.model", "--append-eod", "--no-progress",
                    *extra, expect=expect, process=process)

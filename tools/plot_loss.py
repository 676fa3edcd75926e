r"""Loss curves from a pretrain_vlgpt.py console log (the lines it prints on rank 0) as a PNG:
text cross-entropy and visual MSE per iteration, validation points on top.

    torchrun ... pretrain_vlgpt.py ... | tee train.log
    python tools/plot_loss.py --log train.log --output loss.png
"""

import argparse
import os
import re
import sys

from megatron_vl.atomic import guard_output, temp_name
from megatron_vl.errors import InputError, OutputError, run_cli

TRAIN = re.compile(r"^iteration\s+(\d+)/\d+ \|.*?\| lm loss: (\S+) \| visual loss: (\S+)", re.M)
VALID = re.compile(r"^validation at iteration (\d+) \| lm loss: (\S+) \|.*?\| visual loss: (\S+)", re.M)
# Written into the PNG's tEXt chunk: an existing --output carrying it is a plot this tool made,
# which a rerun may replace; anything else is the user's and needs --overwrite.
SOFTWARE = "megatron-vl tools/plot_loss.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="console output of pretrain_vlgpt.py")
    p.add_argument("--output", required=True,
                   help="PNG to write; an existing file is replaced only when it is a plot this tool made "
                        "(or with --overwrite); never the --log itself")
    p.add_argument("--title", default="VL-GPT pretraining")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output that this tool did not make")
    return p


def read_curves(text):
    """(train, valid, skipped): (iteration, lm loss, visual loss) tuples; `skipped` counts the
    matching lines whose numbers do not parse (e.g. two ranks' output interleaved)."""
    out, skipped = [], 0
    for pattern in (TRAIN, VALID):
        rows = []
        for i, lm, vis in pattern.findall(text):
            try:
                rows.append((int(i), float(lm), float(vis)))
            except ValueError:
                skipped += 1
        out.append(rows)
    return out[0], out[1], skipped


def made_by_this_tool(path: str) -> bool:
    """Whether `path` is a PNG whose tEXt chunks name this tool as its software."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != PNG_SIGNATURE:
                return False
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return False
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False   # text chunks come before the image data in matplotlib's files
                body = fh.read(length + 4)[:length]
                if kind == b"tEXt" and body == b"Software\x00" + SOFTWARE.encode():
                    return True
    except OSError:
        return False


def check_paths(args) -> None:
    """Refuses, before any work: an unreadable --log, an --output that is the log, a folder, in
    a folder that does not exist, or a file this tool did not make (without --overwrite)."""
    if not os.path.isfile(args.log):
        raise InputError(f"--log {args.log}: " + ("is a directory" if os.path.isdir(args.log) else "no such file"))
    guard_output(args.output, inputs=[args.log], overwrite=True)   # never the log, whatever --overwrite says
    if os.path.isdir(args.output):
        raise OutputError(f"--output {args.output} is a directory; name the PNG file to write")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise OutputError(f"--output {args.output}: folder {folder} does not exist")
    if os.path.lexists(args.output) and not made_by_this_tool(args.output):
        guard_output(args.output, overwrite=args.overwrite)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_paths(args)
    try:
        with open(args.log, errors="replace") as fh:
            train, valid, skipped = read_curves(fh.read())
    except OSError as exc:
        raise InputError(f"--log {args.log}: {exc.strerror or exc}") from None
    if skipped:
        print(f"note: {args.log}: skipped {skipped} loss line(s) whose numbers could not be read", file=sys.stderr)
    if not train:
        raise InputError(f"{args.log}: no 'iteration N/M | ... lm loss: ...' lines")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, name in ((axes[0], 1, "text cross-entropy"), (axes[1], 2, "visual MSE")):
        ax.plot([t[0] for t in train], [t[col] for t in train], label="train")
        if valid:
            ax.plot([v[0] for v in valid], [v[col] for v in valid], "o", label="validation")
        ax.set_xlabel("iteration")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    tmp = temp_name(args.output)
    try:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": SOFTWARE})
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    first, last = train[0], train[-1]
    print(f"wrote {args.output}: {len(train)} logged iterations up to {last[0]}; lm loss {first[1]:.3f} -> {last[1]:.3f}, "
          f"visual loss {first[2]:.4f} -> {last[2]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

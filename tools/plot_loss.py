r"""Loss curves from a pretrain_vlgpt.py console log (the lines it prints on rank 0) as a PNG:
text cross-entropy and visual MSE per iteration, validation points on top.

    torchrun ... pretrain_vlgpt.py ... | tee train.log
    python tools/plot_loss.py --log train.log --output loss.png
"""

import argparse
import os
import re
import sys

TRAIN = re.compile(r"^iteration\s+(\d+)/\d+ \|.*?\| lm loss: (\S+) \| visual loss: (\S+)", re.M)
VALID = re.compile(r"^validation at iteration (\d+) \| lm loss: (\S+) \|.*?\| visual loss: (\S+)", re.M)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="console output of pretrain_vlgpt.py")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title", default="VL-GPT pretraining")
    return p


def read_curves(text):
    train = [(int(i), float(lm), float(vis)) for i, lm, vis in TRAIN.findall(text)]
    valid = [(int(i), float(lm), float(vis)) for i, lm, vis in VALID.findall(text)]
    return train, valid


def main(argv=None):
    args = build_parser().parse_args(argv)
    with open(args.log, errors="replace") as fh:
        train, valid = read_curves(fh.read())
    if not train:
        print(f"error: {args.log}: no 'iteration N/M | ... lm loss: ...' lines", file=sys.stderr)
        return 1
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
    tmp = args.output + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, args.output)
    first, last = train[0], train[-1]
    print(f"wrote {args.output}: {len(train)} logged iterations up to {last[0]}; lm loss {first[1]:.3f} -> {last[1]:.3f}, "
          f"visual loss {first[2]:.4f} -> {last[2]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

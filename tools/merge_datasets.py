r"""Concatenate preprocessed datasets (e.g. partitions written on different machines): tokens,
image spans (image ids renumbered), image tables, and the feature stores when every input
with images has one.

    python tools/merge_datasets.py --input data/mmc4_part0_text_document data/mmc4_part1_text_document \
        --output-prefix data/mmc4_text_document
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_vl.data.preprocess import merge_datasets  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in order")
    p.add_argument("--output-prefix", required=True)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        meta = merge_datasets(args.input, args.output_prefix)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged {len(args.input)} datasets -> {args.output_prefix}: {meta['num_documents']} documents, "
          f"{meta['num_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())

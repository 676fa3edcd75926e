r"""Concatenate preprocessed datasets (e.g. partitions written on different machines): tokens,
image spans (image ids renumbered), image tables, and the feature stores. When some inputs
with images have a feature store and others do not, the merge is refused naming those
without one (extract their features first), unless --no-features: then the output has no
feature store. The output prefix is never one of the inputs; an existing one is replaced
only with --overwrite.

    python tools/merge_datasets.py --input data/mmc4_part0_text_document data/mmc4_part1_text_document \
        --output-prefix data/mmc4_text_document
"""

import argparse
import sys

from megatron_vl.data.merge import merge_datasets
from megatron_vl.errors import run_cli


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in order")
    p.add_argument("--output-prefix", required=True, help="the merged dataset; never one of the inputs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset already at --output-prefix (refused otherwise)")
    p.add_argument("--no-features", action="store_true",
                   help="merge tokens, image spans and image tables only, leaving the inputs' feature stores out "
                        "(needed when only some inputs have one; run tools/extract_image_features.py on the output)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    meta = merge_datasets(args.input, args.output_prefix, overwrite=args.overwrite, features=not args.no_features)
    print(f"merged {len(args.input)} datasets -> {args.output_prefix}: {meta['num_documents']} documents, "
          f"{meta['num_images']} images")
    if args.no_features and meta["num_images"]:
        print(f"note: --no-features: {args.output_prefix} has no image feature store; run "
              "tools/extract_image_features.py on it before training")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

r"""Tokenize raw corpora into Megatron indexed binaries plus megatron-vl's image sidecars.

    python tools/preprocess_data.py --input-format mmc4 --input 'mmc4/docs_shard_*_v2.jsonl.zip' \
        --image-root mmc4/images --min-sim 0.24 --output-prefix data/mmc4 \
        --tokenizer-type sentencepiece --tokenizer-model llama/tokenizer.model --prepend-bos --append-eod --workers 16 \
        --doc-sampling paper --max-images-per-doc 5 --subsequence-length 512 --num-image-tokens 32
    python tools/preprocess_data.py --input-format obelics --input 'obelics/*.parquet' --image-root obelics/images \
        --doc-sampling paper ...
    python tools/preprocess_data.py --input-format wds-pairs --input 'cc3m/{00000..00331}.tar' ...
    python tools/preprocess_data.py --input-format jsonl-text --input corpus.jsonl --json-keys text ...
    # instruction data (stage 3): conversations laid out by a template, with a loss mask on the answers
    python tools/preprocess_data.py --input-format llava --input llava_v1_5_mix665k.json --image-root llava/images \
        --conversation-template vicuna_v1 --output-prefix data/llava --tokenizer-model llama/tokenizer.model --prepend-bos
    python tools/preprocess_data.py --input-format coco-captions --input dataset_coco.json --image-root coco ...
    python tools/preprocess_data.py --input-format instructpix2pix --input 'ip2p/*.parquet' ...
    python tools/preprocess_data.py --input-format magicbrush --input 'magicbrush/*.parquet' ...

Writes {output-prefix}_{key}_document.bin/.idx (key: text, or each --json-keys key), and for
image formats the _images / _image_table sidecars and a .meta.json with the report; the
instruction formats add the _loss_mask sidecar (answers only). Templates and their exact
strings: megatron_vl/data/conversation.py.
--doc-sampling paper (mmc4, obelics) cuts each document to the paper's one subsequence of at most
--subsequence-length positions with at most --max-images-per-doc images chosen at random, and
stores only those images (megatron_vl/data/doc_sampling.py); pack, the default, keeps all.
--partitions K processes the inputs in K groups and merges them (tools/merge_datasets.py).
The input formats (megatron_vl/data/format_registry.py) and the flags each reads are listed
at the end.
"""

import argparse
import errno
import os
import sys
import textwrap

from megatron_vl.data.conversation import TEMPLATES
from megatron_vl.data.doc_sampling import INTERLEAVED_FORMATS, MODES, DocSampling
from megatron_vl.data.format_registry import format_names, input_format
from megatron_vl.data.indexed import FeatureStore
from megatron_vl.data.layout import prefix_lock, read_meta, refuse_writing_over, remove_dataset, sidecar
from megatron_vl.data.merge import merge_datasets
from megatron_vl.data.preprocess import preprocess_files
from megatron_vl.data.records import Report, expand_inputs
from megatron_vl.errors import InputError, UsageError, UserError, run_cli


def _formats_using(flag: str) -> str:
    """The formats that read `flag`, for its help."""
    return ", ".join(n for n in format_names() if flag in input_format(n).flags())


def formats_help() -> str:
    """The --help section listing the input formats (format_registry.py), each with the
    flags it reads."""
    lines = ["input formats (--input-format):"]
    for name in format_names():
        fmt = input_format(name)
        flags = fmt.flags()
        lines.append(textwrap.fill(fmt.description + (f" [{', '.join(flags)}]" if flags else ""), width=100,
                                   initial_indent=f"  {name}: ", subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=formats_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    p.add_argument("--input-format", required=True, choices=format_names(),
                   help="what the input files are (the list below)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", default="sentencepiece", choices=["sentencepiece", "hf"])
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--image-root",
                   help=f"directory holding the image files ({_formats_using('--image-root')})")
    p.add_argument("--min-sim", type=float, default=0.0,
                   help=f"{_formats_using('--min-sim')}: drop images whose matched_sim is lower")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help=f"{_formats_using('--json-keys')}: keys to tokenize, one dataset each")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's eos id to each document")
    p.add_argument("--prepend-bos", action="store_true",
                   help="start each document with the tokenizer's bos id, as LLaMA was trained (use it for LLaMA "
                        "data; off by default so jsonl-text output stays byte-identical to Megatron's)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (0 or 1: in this process); text "
                   "is encoded on one thread per CPU each process gets (taskset limits them)")
    p.add_argument("--partitions", type=int, default=1,
                   help="process the inputs in this many groups (at most one per file), then merge")
    p.add_argument("--strict", action="store_true", help="any skipped record is an error")
    p.add_argument("--conversation-template", default="vicuna_v1", choices=sorted(TEMPLATES),
                   help=f"{_formats_using('--conversation-template')}: how a conversation is laid out "
                        "(megatron_vl/data/conversation.py)")
    p.add_argument("--coco-splits", nargs="+", default=["train", "restval"],
                   help=f"{_formats_using('--coco-splits')}: the Karpathy splits to take")
    p.add_argument("--seed", type=int, default=0,
                   help=f"{_formats_using('--seed')}: seed of the per-image phrasing and caption; "
                        "--doc-sampling paper: seed of the image choice")
    interleaved = ", ".join(INTERLEAVED_FORMATS)
    p.add_argument("--doc-sampling", choices=MODES, default="pack",
                   help=f"{interleaved}: pack keeps every image and all text (Megatron-style packing at training); "
                        "paper cuts each document to one subsequence with at most --max-images-per-doc images chosen "
                        "at random with their sentences (VL-GPT; megatron_vl/data/doc_sampling.py): only those are "
                        "stored")
    p.add_argument("--max-images-per-doc", type=int,
                   help="--doc-sampling paper: images chosen per document at most "
                        f"(default {DocSampling.max_images_per_doc})")
    p.add_argument("--subsequence-length", type=int,
                   help="--doc-sampling paper: laid-out positions per document at most: text tokens, BOS, EOD and "
                        f"N + 2 per image (default {DocSampling.subsequence_length})")
    p.add_argument("--num-image-tokens", type=int,
                   help="--doc-sampling paper: N, visual embeddings per image, as training will use "
                        f"(default {DocSampling.num_image_tokens})")
    p.add_argument("--no-progress", action="store_true")
    return p


def doc_sampling(args) -> DocSampling:
    """The --doc-sampling settings; the paper mode's flags given without it are refused (they
    would do nothing), as is the mode on a format it does not apply to."""
    given = [f for f, v in (("--max-images-per-doc", args.max_images_per_doc),
                            ("--subsequence-length", args.subsequence_length),
                            ("--num-image-tokens", args.num_image_tokens)) if v is not None]
    if given and args.doc_sampling != "paper":
        raise UsageError(f"{given[0]} is read by --doc-sampling paper only (this run packs: --doc-sampling "
                         f"{args.doc_sampling})")
    defaults = DocSampling()
    sampling = DocSampling(args.doc_sampling, _or(args.max_images_per_doc, defaults.max_images_per_doc),
                           _or(args.subsequence_length, defaults.subsequence_length),
                           _or(args.num_image_tokens, defaults.num_image_tokens), args.seed)
    sampling.check(args.input_format, args.prepend_bos, args.append_eod)
    return sampling


def _or(value, default):
    return default if value is None else value


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, value in (("--workers", args.workers), ("--partitions", args.partitions)):
        if value < 0:
            raise UsageError(f"{flag} {value}: cannot be negative")
    sampling = doc_sampling(args)
    files = expand_inputs(args.input)
    keys = args.json_keys if "json_key" in input_format(args.input_format).options else ["text"]
    parts = max(1, min(args.partitions, len(files)))
    for key in keys:
        prefix = f"{args.output_prefix}_{key}_document"
        groups = [files[i::parts] for i in range(parts)]
        targets = [prefix] if parts == 1 else [f"{prefix}_part{i}" for i in range(parts)]
        report = Report()
        refuse_writing_over(prefix, files)
        try:
            with prefix_lock(prefix):
                try:
                    for group, target in zip(groups, targets):
                        r = preprocess_files(group, target, args.input_format, args.tokenizer_type,
                                             args.tokenizer_model, image_root=args.image_root, min_sim=args.min_sim,
                                             json_key=key, append_eod=args.append_eod,
                                             prepend_bos=args.prepend_bos, workers=args.workers,
                                             strict=args.strict, progress=not args.no_progress,
                                             template=args.conversation_template, coco_splits=args.coco_splits,
                                             seed=args.seed, sampling=sampling)
                        report.merge(r)
                    if parts > 1:
                        merge_datasets(targets, prefix)
                finally:
                    if parts > 1:   # partitions are scratch: never left behind, finished or not
                        for t in targets:
                            remove_dataset(t)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, UserError):
                raise   # run_cli names a full disk; a UserError's message is already the whole report
            raise UserError(f"{exc.filename or prefix}: {exc.strerror or exc}") from None
        print(f"== {prefix}\n{report.format()}")
        if not report.documents_written and report.skipped:
            # Every record refused: most likely the wrong --input-format, never a dataset to train on.
            reason, count = report.skipped.most_common(1)[0]
            raise InputError(f"{prefix}: no document written: all {sum(report.skipped.values())} records were skipped "
                             f"(most: {reason}, {count}, first at {report.first_seen[reason]}); is --input-format "
                             f"{args.input_format} right for {args.input[0]}?")
        features = sidecar(prefix, "features")
        if os.path.isfile(features + ".idx"):
            try:
                FeatureStore(features, source=read_meta(prefix)["fingerprint"].get("table"))
            except ValueError:
                print(f"note: {features}.* was made from the previous data under this prefix; training refuses it "
                      "until tools/extract_image_features.py is run again")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Concatenating datasets (e.g. the partitions of one preprocessing run) into a new prefix: image
ids renumbered, feature stores concatenated or, when some inputs lack one, the merge refused."""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from ..atomic import remove_stale_temps
from ..errors import OutputError
from .indexed import FeatureStore, IndexedDataset, write_concatenated
from .layout import dataset_files, prefix_lock, read_meta, refuse_writing_over, sidecar, table_fingerprint
from .records import DataInputError, DataUsageError, Report
from .writer import DatasetWriter

PACK = {"mode": "pack"}   # what a dataset made before --doc-sampling existed did (doc_sampling.py)


def merge_datasets(inputs: List[str], output: str, *, overwrite: bool = True, features: bool = True) -> Dict:
    """Concatenates datasets (e.g. partitions) in order; image ids are renumbered. The output
    is never one of the inputs; an existing output is refused unless `overwrite`. With
    `features`, the feature stores are concatenated too, and an input with images but without
    a feature store (while another has one) is refused; features=False merges the tokens,
    spans and image tables only."""
    refuse_writing_over(output, [f for p in inputs for f in dataset_files(p)] + [os.path.abspath(p) for p in inputs])
    if not overwrite:
        present = [f for f in dataset_files(output) if os.path.lexists(f)]
        if present:
            raise OutputError(f"--output-prefix {output}: {present[0]} already exists and this run did not make "
                              "it; choose another prefix, or pass --overwrite to replace that dataset")
    with prefix_lock(output):
        remove_stale_temps(os.path.dirname(os.path.abspath(output)), prefix=os.path.basename(output))
        return _merge_datasets(inputs, output, features)


def _merge_datasets(inputs: List[str], output: str, features: bool) -> Dict:
    metas = [read_meta(p) for p in inputs]
    for p, m in zip(inputs[1:], metas[1:]):
        if m["tokenizer"] != metas[0]["tokenizer"] or m["multimodal"] != metas[0]["multimodal"] or \
                bool(m.get("loss_mask")) != bool(metas[0].get("loss_mask")):
            raise DataInputError(f"{p}: tokenizer or kind differs from {inputs[0]}; cannot merge")
        if (m.get("doc_sampling") or PACK) != (metas[0].get("doc_sampling") or PACK):
            raise DataInputError(f"{p}: made with doc_sampling {m.get('doc_sampling') or PACK}, {inputs[0]} with "
                                 f"{metas[0].get('doc_sampling') or PACK}; cannot merge")
    stores = _feature_inputs(inputs, metas) if features else []
    writer = DatasetWriter(output, metas[0]["tokenizer"], metas[0]["multimodal"], bool(metas[0].get("loss_mask")))
    report = Report()
    try:
        for p, m in zip(inputs, metas):
            writer.tokens.append_dataset(p)
            if writer.loss_mask is not None:
                writer.loss_mask.append_dataset(sidecar(p, "loss_mask"))
            if writer.multimodal:
                spans = IndexedDataset(sidecar(p, "images"))
                for d in range(spans.num_documents):
                    seq = np.array(spans[d], dtype=np.int64)
                    seq[2::3] += writer.num_images
                    writer.images.add_item(seq)
                    writer.images.end_document()
                writer.table.append_dataset(sidecar(p, "table"))
                writer.num_images += m["num_images"]
            report.merge(Report.from_dict(m["report"]))
        writer.finalize(report, {"format": metas[0].get("format"), "inputs": [i for m in metas for i in m.get("inputs", [])],
                                 "append_eod": metas[0].get("append_eod"), "prepend_bos": metas[0].get("prepend_bos"),
                                 "merged_from": inputs,
                                 **({"conversation_template": metas[0]["conversation_template"]}
                                    if "conversation_template" in metas[0] else {}),
                                 **({"doc_sampling": metas[0]["doc_sampling"]} if "doc_sampling" in metas[0] else {})})
    except BaseException:
        writer.abort()
        raise
    if stores:
        write_concatenated(sidecar(output, "features"), stores, table_fingerprint(output))
    return read_meta(output)


def _feature_inputs(inputs: List[str], metas: List[Dict]) -> List:
    """The feature stores to concatenate, checked before anything is written: none when no
    input has one; all of the inputs with images when any has one (a merge would otherwise
    drop them silently)."""
    with_images = [(p, m) for p, m in zip(inputs, metas) if m.get("num_images")]
    have = [p for p, _ in with_images if os.path.lexists(sidecar(p, "features") + ".idx")]
    if not have:
        return []
    lacking = [p for p, _ in with_images if p not in have]
    if lacking:
        raise DataUsageError(f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no image feature store "
                             f"({sidecar(lacking[0], 'features')}.idx) while {have[0]} has one: run "
                             "tools/extract_image_features.py on it, or pass --no-features to merge the tokens and "
                             "images only (then extract features for the output)")
    stores = [FeatureStore(sidecar(p, "features"), expected_count=m["num_images"], source=table_fingerprint(p, m),
                           table=sidecar(p, "table") + ".bin") for p, m in with_images]
    if len({s.shape for s in stores}) != 1:
        raise DataInputError(f"feature stores of {[p for p, _ in with_images]} differ in shape "
                             f"({sorted({s.shape for s in stores})}); cannot merge")
    return stores

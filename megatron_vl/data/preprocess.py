"""Raw documents -> tokenized indexed binaries (Megatron's layout) plus the multimodal sidecars.

For a dataset prefix ``P`` (``{output_prefix}_{key}_document``, Megatron's naming):

- ``P.bin/.idx``              text tokens, one sequence per document (MMIDIDX; uint16 when the
                              vocabulary fits, int32 otherwise) — what Megatron's tools read
- ``P_images.bin/.idx``       int64 MMIDIDX, one sequence per document: (start, end, image)
                              triples — the token span of the sentence an image belongs to
                              and its row in the image table
- ``P_image_table.bin/.idx``  uint8 MMIDIDX, one sequence per image: its encoded bytes
- ``P_loss_mask.bin/.idx``    uint8 MMIDIDX, instruction data only, one sequence per document:
                              1 per answer token, 0 per context token, then one flag per
                              image in span order (1: an image the assistant produces)
- ``P.meta.json``             tokenizer (with the ``[IMG]``/``[/IMG]`` ids), format, report,
                              the conversation template, the content fingerprint of each
                              of the files, and the smallest and largest token id written
                              (``token_ids``: training compares them with the vocabulary
                              in O(1) instead of reading the whole ``.bin``)
- ``P_image_features.*``      written later by tools/extract_image_features.py, tied to the
                              image table's fingerprint
- ``P.lock``                  present while a run writes the prefix (a second run is refused)

Every image is fully decoded here (``Image.verify()`` alone does not read JPEG data): an
image that does not decode is counted under "image unreadable" with its place and dropped
from its document (the document's text is kept).
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..atomic import atomic_open, exclusive_lock, guard_output, remove_stale_temps, temp_name
from ..errors import InputError, OutputError
from .conversation import Conversation, encode_pieces, get_template
from .formats import (DataInputError, DataUsageError, RawDocument, Report, guarded, read_records,
                      record_document)
from .instruct_formats import INSTRUCT_FORMATS, read_conversations
from .indexed import IndexedDataset, IndexedDatasetWriter, optimal_token_dtype
from .tokenizer import Tokenizer
from .workers import EncodePool

META_VERSION = 2   # 2: content fingerprints
_worker_tokenizer: Optional[Tokenizer] = None


def sidecar(prefix: str, kind: str) -> str:
    return {"images": f"{prefix}_images", "table": f"{prefix}_image_table", "loss_mask": f"{prefix}_loss_mask",
            "features": f"{prefix}_image_features", "meta": f"{prefix}.meta.json", "lock": f"{prefix}.lock"}[kind]


def prefix_lock(prefix: str):
    """Held while a run writes `prefix` or its derived files: a concurrent second run on the
    same prefix is refused, naming the first."""
    return exclusive_lock(sidecar(prefix, "lock"), f"dataset prefix {prefix}")


def table_fingerprint(prefix: str, meta: Optional[Dict] = None) -> str:
    """The image table's content fingerprint, which a feature store must carry."""
    return (meta or read_meta(prefix))["fingerprint"]["table"]


class MetaMissing(InputError, FileNotFoundError):
    """A dataset prefix without its .meta.json."""


def _init_worker(kind: str, model: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(kind, model)


def _encode_batch(tasks):
    """What a worker process runs: a batch of records, encoded in order."""
    return [_encode_task(t) for t in tasks]


def _image_bytes(ref) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, None) for a decodable image, else (None, reason)."""
    from PIL import Image
    data = ref.data
    if data is None:
        if not ref.path or not os.path.isfile(ref.path):
            return None, "image file missing"
        try:
            with open(ref.path, "rb") as fh:
                data = fh.read()
        except OSError:   # unreadable (permissions, I/O error): the image is lost, not the run
            return None, "image unreadable"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()   # a full decode: verify() does not read JPEG scan data, so cut-short files pass it
    except Exception:
        return None, "image unreadable"
    return data, None


def encode_document(doc: RawDocument, append_eod: bool, tokenizer: Optional[Tokenizer] = None,
                    prepend_bos: bool = False):
    """(tokens, [(start, end, image bytes)], [(reason, where)]) for one document; tokens is
    None when the document is skipped."""
    tok = tokenizer or _worker_tokenizer
    tokens: List[int] = [tok.bos_id] if prepend_bos else []
    spans = []
    for sentence in doc.sentences:
        start = len(tokens)
        tokens.extend(tok.encode(sentence))
        spans.append((start, len(tokens)))
    if len(tokens) == int(prepend_bos):
        return None, [], [("empty document", doc.source)]
    skips, images = [], []
    for sentence_index, ref in doc.images:
        data, why = _image_bytes(ref)
        if why:
            skips.append((why, ref.name if ref.path is None else f"{doc.source} {ref.path}"))
            continue
        start, end = spans[sentence_index]
        images.append((start, end, data))
    if append_eod:
        tokens.append(tok.eod_id)
    return tokens, images, skips


def encode_conversation(conv: Conversation, template: str, tokenizer: Optional[Tokenizer] = None,
                        prepend_bos: bool = False):
    """(tokens, [(pos, pos, image bytes)], loss mask, [(reason, where)]) for one conversation:
    the template's pieces tokenized; each image a zero-length span, so its block goes exactly
    where the template put it. A record with an image that is missing or does not decode is
    skipped whole (its turns would not make sense without it)."""
    tok = tokenizer or _worker_tokenizer
    pieces = get_template(template).render(conv)
    tokens, mask, placed = encode_pieces(pieces, tok.encode, tok.eod_id, tok.bos_id if prepend_bos else None)
    images, flags = [], []
    for pos, ref, answer in placed:
        data, why = _image_bytes(ref)
        if why:
            return None, [], None, [(why, f"{conv.source} ({ref.path or ref.name})")]
        images.append((pos, pos, data))
        flags.append(int(answer))
    if not any(mask) and not any(flags):
        return None, [], None, [("empty answer", conv.source)]
    return tokens, images, mask + flags, []


def _encode_task(args, tokenizer: Optional[Tokenizer] = None):
    """Record -> (is a document, tokens, images, loss mask or None, this record's report).
    Runs in a worker: JSON parsing, tokenization and the image checks all happen here."""
    fmt, record, opts, flags = args
    report = Report()
    where = _task_place(args)
    # A record that breaks the encoder in a way no check foresaw is counted with its place
    # (an error under --strict), not the end of the run.
    out = guarded(report, where, opts["strict"], lambda: _encode_record(fmt, record, opts, flags, report, tokenizer))
    if out is None:
        return False, None, [], None, report
    tokens, images, mask = out
    # Most records are clean: send no report back for them (less to pickle per record).
    return True, tokens, images, mask, report if report.skipped else None


def _task_place(task) -> str:
    record = task[1]
    return getattr(record, "where", None) or getattr(record, "source", None) or "?"


def _encode_record(fmt, record, opts, flags, report: Report, tokenizer: Optional[Tokenizer]):
    append_eod, prepend_bos = flags
    if isinstance(record, Conversation):
        tokens, images, mask, skips = encode_conversation(record, opts["template"], tokenizer, prepend_bos)
    else:
        doc = record_document(fmt, record, report, **{k: v for k, v in opts.items() if k != "template"})
        if doc is None:
            return None
        tokens, images, skips = encode_document(doc, append_eod, tokenizer, prepend_bos)
        mask = None
    for reason, where in skips:
        report.skip(reason, where, opts["strict"])
    return tokens, images, mask


class DatasetWriter:
    """The four files of one dataset prefix, written together and renamed into place."""

    def __init__(self, prefix: str, tokenizer_meta: Dict, multimodal: bool, loss_mask: bool = False):
        self.prefix, self.meta, self.multimodal = prefix, tokenizer_meta, multimodal
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.tokens = IndexedDatasetWriter(prefix, optimal_token_dtype(tokenizer_meta["vocab_size"]), track_range=True)
        self.images = IndexedDatasetWriter(sidecar(prefix, "images"), np.int64) if multimodal else None
        self.table = IndexedDatasetWriter(sidecar(prefix, "table"), np.uint8) if multimodal else None
        self.loss_mask = IndexedDatasetWriter(sidecar(prefix, "loss_mask"), np.uint8) if loss_mask else None
        self.num_images = 0

    def add(self, tokens, images, mask=None) -> None:
        self.tokens.add_item(tokens)
        self.tokens.end_document()
        if self.loss_mask is not None:
            self.loss_mask.add_item(mask)
            self.loss_mask.end_document()
        if self.multimodal:
            triples = []
            for start, end, data in images:
                self.table.add_item(np.frombuffer(data, dtype=np.uint8))
                self.table.end_document()
                triples.extend((start, end, self.num_images))
                self.num_images += 1
            self.images.add_item(triples)
            self.images.end_document()

    def writers(self):
        return [w for w in (self.tokens, self.images, self.table, self.loss_mask) if w is not None]

    def finalize(self, report: Report, extra: Dict) -> None:
        for w in self.writers():
            w.finalize()
        names = {"tokens": self.tokens, "images": self.images, "table": self.table, "loss_mask": self.loss_mask}
        meta = {"version": META_VERSION, "multimodal": self.multimodal, "tokenizer": self.meta,
                "num_documents": len(self.tokens.document_indices) - 1, "num_images": self.num_images,
                "loss_mask": self.loss_mask is not None,
                "fingerprint": {k: w.fingerprint for k, w in names.items() if w is not None},
                "token_ids": {"min": self.tokens.smallest, "max": self.tokens.largest},
                "report": report.to_dict(), **extra}
        with atomic_open(sidecar(self.prefix, "meta")) as fh:
            json.dump(meta, fh, indent=2)

    def abort(self) -> None:
        """Removes every temporary file; never raises, so the error that led here is the one
        reported (on a full disk, closing a writer flushes its buffer and fails again)."""
        for w in self.writers():
            try:
                w.abort()
            except OSError:
                pass
            for path in (temp_name(w.prefix + ".bin"), temp_name(w.prefix + ".idx")):
                try:
                    os.remove(path)
                except OSError:
                    pass


def preprocess_files(files: List[str], prefix: str, fmt: str, tokenizer_type: str, tokenizer_model: str, *,
                     image_root: Optional[str] = None, min_sim: float = 0.0, json_key: str = "text",
                     append_eod: bool = False, prepend_bos: bool = False, workers: int = 1,
                     strict: bool = False, progress: bool = True, template: str = "vicuna_v1",
                     coco_splits=("train", "restval"), seed: int = 0) -> Report:
    """Tokenizes every document (or conversation, for the instruction formats, laid out by
    `template`) of `files` into the dataset `prefix`. Returns the report."""
    if workers < 0:
        raise DataUsageError(f"--workers {workers}: the number of tokenizing processes cannot be negative")
    with prefix_lock(prefix):
        # What a run killed mid-way (kill -9, a full disk) left under this prefix.
        remove_stale_temps(os.path.dirname(os.path.abspath(prefix)), prefix=os.path.basename(prefix))
        return _preprocess_files(files, prefix, fmt, tokenizer_type, tokenizer_model, image_root, min_sim, json_key,
                                 append_eod, prepend_bos, workers, strict, progress, template, coco_splits, seed)


def _preprocess_files(files, prefix, fmt, tokenizer_type, tokenizer_model, image_root, min_sim, json_key,
                      append_eod, prepend_bos, workers, strict, progress, template, coco_splits, seed) -> Report:
    from tqdm import tqdm
    tokenizer = Tokenizer(tokenizer_type, tokenizer_model)
    if prepend_bos and (tokenizer.bos_id is None or tokenizer.bos_id < 0):
        raise DataUsageError(f"--prepend-bos: tokenizer {tokenizer_model} has no BOS token")
    multimodal = fmt != "jsonl-text"
    conversational = fmt in INSTRUCT_FORMATS
    if conversational:
        get_template(template)   # an unknown name fails here, before any reading
    report = Report()
    writer = DatasetWriter(prefix, tokenizer.meta(), multimodal, loss_mask=conversational)
    pool = None
    opts = {"image_root": image_root, "min_sim": min_sim, "json_key": json_key, "strict": strict,
            "template": template}
    bar = tqdm(desc=f"preprocess {os.path.basename(prefix)}", unit="doc", disable=not progress, smoothing=0.1)
    try:
        if workers > 1:
            pool = EncodePool(workers, _encode_batch, _init_worker, (tokenizer_type, tokenizer_model))
        for path in files:
            records = read_conversations(fmt, path, report, image_root=image_root, strict=strict,
                                         coco_splits=coco_splits, seed=seed) if conversational else \
                read_records(fmt, path, report, image_root=image_root, json_key=json_key, strict=strict)
            tasks = ((fmt, record, opts, (append_eod, prepend_bos)) for record in records)
            results = pool.imap(tasks, path, prefix, where=_task_place) if pool else \
                map(functools.partial(_encode_task, tokenizer=tokenizer), tasks)
            for is_document, tokens, images, mask, record_report in results:
                if record_report is not None:
                    report.merge(record_report)
                if not is_document:
                    continue
                report.documents_read += 1
                bar.update(1)
                if tokens is None:
                    continue
                writer.add(tokens, images, mask)
                report.documents_written += 1
                report.images_placed += len(images)
        extra = {"format": fmt, "inputs": files, "append_eod": append_eod, "prepend_bos": prepend_bos}
        if conversational:
            extra["conversation_template"] = template
        writer.finalize(report, extra)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return report


def read_meta(prefix: str) -> Dict:
    path = sidecar(prefix, "meta")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise MetaMissing(f"{path}: dataset metadata missing (was {prefix} written by "
                          f"tools/preprocess_data.py?)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataInputError(f"{path}: unreadable dataset metadata ({exc})") from None
    version = meta.get("version") if isinstance(meta, dict) else None
    if version != META_VERSION or "fingerprint" not in meta:
        raise DataInputError(f"{path}: metadata version {version} has no content fingerprints (this code "
                             f"reads version {META_VERSION}); re-run tools/preprocess_data.py for {prefix}")
    return meta


def dataset_files(prefix: str) -> List[str]:
    """The files of a dataset prefix, feature store included."""
    bases = [prefix] + [sidecar(prefix, k) for k in ("images", "table", "loss_mask", "features")]
    return [b + ext for b in bases for ext in (".bin", ".idx")] + [sidecar(prefix, "meta")]


def refuse_writing_over(prefix: str, inputs: List[str]) -> None:
    """OutputError when a file of dataset `prefix` would be one of `inputs` (a merge into one
    of its own inputs replaced that input)."""
    if os.path.abspath(prefix) in inputs:
        raise OutputError(f"--output-prefix {prefix} is also an input of this run; choose another name")
    for f in dataset_files(prefix):
        guard_output(f, inputs=[i for i in inputs if os.path.lexists(i)] if os.path.lexists(f) else (),
                     overwrite=True, flag="--output-prefix")


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
            r = Report(m["report"]["documents_read"], m["report"]["documents_written"], m["report"]["images_placed"])
            r.skipped.update(m["report"]["skipped"])
            r.first_seen.update(m["report"]["first_seen"])
            report.merge(r)
        writer.finalize(report, {"format": metas[0].get("format"), "inputs": [i for m in metas for i in m.get("inputs", [])],
                                 "append_eod": metas[0].get("append_eod"), "prepend_bos": metas[0].get("prepend_bos"),
                                 "merged_from": inputs,
                                 **({"conversation_template": metas[0]["conversation_template"]}
                                    if "conversation_template" in metas[0] else {})})
    except BaseException:
        writer.abort()
        raise
    if stores:
        from .indexed import write_concatenated
        write_concatenated(sidecar(output, "features"), stores, table_fingerprint(output))
    return read_meta(output)


def _feature_inputs(inputs: List[str], metas: List[Dict]) -> List:
    """The feature stores to concatenate, checked before anything is written: none when no
    input has one; all of the inputs with images when any has one (a merge would otherwise
    drop them silently)."""
    from .indexed import FeatureStore
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


def remove_dataset(prefix: str) -> None:
    for base in (prefix, sidecar(prefix, "images"), sidecar(prefix, "table"), sidecar(prefix, "loss_mask")):
        for ext in (".bin", ".idx"):
            if os.path.exists(base + ext):
                os.remove(base + ext)
    if os.path.exists(sidecar(prefix, "meta")):
        os.remove(sidecar(prefix, "meta"))


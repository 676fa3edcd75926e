"""Raw documents and conversations -> a tokenized dataset prefix (its files: layout.py).

Each input file is read by its format's reader (format_registry.py); the records are encoded
(tokenized, images checked) in this process or in worker processes (workers.py) and written
in order (writer.py). Every image is fully decoded here (``Image.verify()`` alone does not
read JPEG data): an image that does not decode is counted under "image unreadable" with its
place and dropped from its document (the document's text is kept). Under --doc-sampling paper
only the images doc_sampling.py chooses are read; it cuts the document in one call.
"""

from __future__ import annotations

import functools
import io
import os
from typing import List, Optional, Tuple

from ..atomic import remove_stale_temps
from .conversation import Conversation, encode_pieces, get_template
from .doc_sampling import INTERLEAVED_FORMATS, DocSampling, cut_document
from .format_registry import ReadOptions, input_format
# Importers of preprocess (tests, benchmarks, training/data.py) find the prefix layout, the
# writer and the merge here too; their homes are layout.py, writer.py and merge.py.
from .layout import prefix_lock, read_meta, sidecar, table_fingerprint  # noqa: F401
from .merge import merge_datasets  # noqa: F401
from .records import DataUsageError, RawDocument, Report, guarded
from .lanes import ordered_map, threads_per_process
from .tokenizer import Tokenizer
from .workers import EncodePool
from .writer import DatasetWriter, as_array

_worker_tokenizer: Optional[Tokenizer] = None
_worker_threads = 1


def _init_worker(kind: str, model: str, threads: int = 1) -> None:
    global _worker_tokenizer, _worker_threads
    _worker_tokenizer = Tokenizer(kind, model)
    _worker_threads = threads if _worker_tokenizer.thread_safe else 1


def _encode_batch(tasks):
    """What a worker process runs: a batch of records, encoded in order (on its threads, lanes.py)."""
    return list(ordered_map(_encode_task, tasks, _worker_threads, chunk=8))


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
                    prepend_bos: bool = False, sampling: Optional[DocSampling] = None,
                    report: Optional[Report] = None):
    """(tokens, [(start, end, image bytes)], [(reason, where)]) for one document; tokens is
    None when the document is skipped. sampling (paper mode): the document cut to one
    subsequence, only its chosen images read; what the cut leaves out is counted in report."""
    tok = tokenizer or _worker_tokenizer
    tokens: List[int] = [tok.bos_id] if prepend_bos else []
    spans = []
    for sentence in doc.sentences:
        start = len(tokens)
        tokens.extend(tok.encode(sentence))
        spans.append((start, len(tokens)))
    if len(tokens) == int(prepend_bos):
        return None, [], [("empty document", doc.source)]
    if sampling is not None and sampling.paper:   # doc_sampling.py; the images not chosen are never read
        return cut_document(sampling, doc, tokens, spans, _image_bytes, prepend_bos,
                            tok.eod_id if append_eod else None, report if report is not None else Report())
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


def _encode_task(task, tokenizer: Optional[Tokenizer] = None):
    """Record -> (is a document, tokens, images, loss mask or None, this record's report).
    Runs in a worker: parsing, tokenization and the image checks all happen here. `task`:
    (the format's parse or None, the record, ReadOptions, (append_eod, prepend_bos, template, sampling))."""
    parse, record, options, flags = task
    report = Report()
    where = _task_place(task)
    # A record that breaks the encoder in a way no check foresaw is counted with its place
    # (an error under --strict), not the end of the run.
    out = guarded(report, where, options.strict,
                  lambda: _encode_record(parse, record, options, flags, report, tokenizer))
    if out is None:
        return False, None, [], None, report
    tokens, images, mask = out
    # Most records are clean: send no report back for them (less to pickle per record). Arrays,
    # not lists, go back: a worker's result unpickles ten times faster (writer.as_array).
    return True, as_array(tokens), images, as_array(mask), report if report.skipped or report.cuts else None


def _task_place(task) -> str:
    record = task[1]
    return getattr(record, "where", None) or getattr(record, "source", None) or "?"


def _encode_record(parse, record, options: ReadOptions, flags, report: Report, tokenizer: Optional[Tokenizer]):
    append_eod, prepend_bos, template, sampling = flags
    if isinstance(record, Conversation):
        tokens, images, mask, skips = encode_conversation(record, template, tokenizer, prepend_bos)
    else:
        doc = parse(record, report, options) if parse is not None else record
        if doc is None:
            return None
        tokens, images, skips = encode_document(doc, append_eod, tokenizer, prepend_bos, sampling, report)
        mask = None
    for reason, where in skips:
        report.skip(reason, where, options.strict)
    return tokens, images, mask


def preprocess_files(files: List[str], prefix: str, fmt: str, tokenizer_type: str, tokenizer_model: str, *,
                     image_root: Optional[str] = None, min_sim: float = 0.0, json_key: str = "text",
                     append_eod: bool = False, prepend_bos: bool = False, workers: int = 1,
                     strict: bool = False, progress: bool = True, template: str = "vicuna_v1",
                     coco_splits=("train", "restval"), seed: int = 0,
                     sampling: Optional[DocSampling] = None) -> Report:
    """Tokenizes every document (or conversation, for the instruction formats, laid out by
    `template`) of `files` into the dataset `prefix`. Returns the report. sampling: how
    interleaved documents are cut (doc_sampling.py; None: pack mode, every image kept)."""
    if workers < 0:
        raise DataUsageError(f"--workers {workers}: the number of tokenizing processes cannot be negative")
    input_format(fmt)   # an unknown name fails here, before anything is written
    sampling = sampling or DocSampling()
    sampling.check(fmt, prepend_bos, append_eod)
    with prefix_lock(prefix):
        # What a run killed mid-way (kill -9, a full disk) left under this prefix.
        remove_stale_temps(os.path.dirname(os.path.abspath(prefix)), prefix=os.path.basename(prefix))
        return _preprocess_files(files, prefix, fmt, tokenizer_type, tokenizer_model, image_root, min_sim, json_key,
                                 append_eod, prepend_bos, workers, strict, progress, template, coco_splits, seed,
                                 sampling)


def _preprocess_files(files, prefix, fmt, tokenizer_type, tokenizer_model, image_root, min_sim, json_key,
                      append_eod, prepend_bos, workers, strict, progress, template, coco_splits, seed,
                      sampling) -> Report:
    from tqdm import tqdm
    tokenizer = Tokenizer(tokenizer_type, tokenizer_model)
    if prepend_bos and (tokenizer.bos_id is None or tokenizer.bos_id < 0):
        raise DataUsageError(f"--prepend-bos: tokenizer {tokenizer_model} has no BOS token")
    reader = input_format(fmt)
    if reader.instruct:
        get_template(template)   # an unknown name fails here, before any reading
    report = Report()
    writer = DatasetWriter(prefix, tokenizer.meta(), reader.images, loss_mask=reader.instruct)
    pool = None
    options = ReadOptions(image_root=image_root, min_sim=min_sim, json_key=json_key, strict=strict,
                          coco_splits=tuple(coco_splits), seed=seed)
    flags = (append_eod, prepend_bos, template, sampling if sampling.paper else None)
    bar = tqdm(desc=f"preprocess {os.path.basename(prefix)}", unit="doc", disable=not progress, smoothing=0.1)
    try:
        # Each tokenizing process encodes text on its share of the CPUs (lanes.py): --workers 0/1
        # on all. Not records with images: PIL parses an image's headers in Python, holding the
        # GIL, and MMC4 ran 15% slower on two threads than on one (measured); workers scale it.
        threads = threads_per_process(workers) if tokenizer.thread_safe and not reader.images else 1
        if workers > 1:
            pool = EncodePool(workers, _encode_batch, _init_worker, (tokenizer_type, tokenizer_model, threads),
                              local=functools.partial(_encode_task, tokenizer=tokenizer))
        for path in files:
            tasks = ((reader.parse, record, options, flags) for record in reader.read(path, report, options))
            results = pool.imap(tasks, path, prefix, where=_task_place) if pool else \
                ordered_map(functools.partial(_encode_task, tokenizer=tokenizer), tasks, threads)
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
        if reader.instruct:
            extra["conversation_template"] = template
        if fmt in INTERLEAVED_FORMATS:
            extra["doc_sampling"] = sampling.meta()
        writer.finalize(report, extra)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return report

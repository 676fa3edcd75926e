"""Preprocessing's faster paths write what the plain one writes: text encoded on threads
(lanes.py), workers with the parent encoding while they start (workers.py), orjson for the
JSON lines (jsonl.py): the same bytes, the same report."""

import json
import os
import threading
import zipfile

import pytest

from data_helpers import run_tool
import megatron_vl.data.jsonl as jsonl
import megatron_vl.data.preprocess as pp
from megatron_vl.data.lanes import ordered_map
from megatron_vl.data.records import Report


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("lanes")
    run_tool("tools/make_sample_data.py", "--output", str(d), "--documents", "12", "--pairs", "4")
    return d


def test_ordered_map_keeps_the_order_and_raises_at_the_item(monkeypatch):
    drawn_on = set()

    def items():
        for i in range(50):
            drawn_on.add(threading.get_ident())
            yield i
    assert list(ordered_map(lambda i: i * i, items(), threads=3, chunk=4)) == [i * i for i in range(50)]
    assert drawn_on == {threading.get_ident()}   # the input is read on the calling thread

    def fails_at_17(i):
        if i == 17:
            raise ValueError("item 17")
        return i
    got = []
    with pytest.raises(ValueError, match="item 17"):
        for r in ordered_map(fails_at_17, range(50), threads=3, chunk=4):
            got.append(r)
    assert got == list(range(17))


LINES = ['{"text": "plain"}', '{"a": 1, "a": 2}', '{"n": 123456789012345678901234567890}',
         '{"n": -9223372036854775809}', '{"n": [1, {"m": 18446744073709551616}]}', '{"x": NaN}', '{"x": 1e400}',
         '{"s": "\\ud800"}', '{"s": "caf\\u00e9 \\ud83d\\ude00"}', '{"f": 0.1, "g": 4.9e-324, "h": 1e19}',
         '{bad', '{"a": 1,}', '[1, 2]', '"just a string"', '   ', '{"a": 1} trailing']


@pytest.mark.parametrize("fast", [True, False], ids=["orjson", "json-only"])
def test_json_lines_read_as_json_reads_them(fast, monkeypatch):
    """orjson reads integers past 64 bits as floats and refuses NaN and lone surrogates: such
    lines go to json, so the objects and the skip messages are json's either way."""
    if not fast:
        monkeypatch.setattr(jsonl, "_fast_loads", json.loads)
    for line in LINES:
        ours, theirs = Report(), Report()
        got = jsonl.parse_json_object("f:1", line, ours, False)
        try:
            want = json.loads(line) if line.strip() else None
            if want is not None and not isinstance(want, dict):
                theirs.skip("malformed JSON line", "f:1 (not an object)")
                want = None
        except json.JSONDecodeError as exc:
            theirs.skip("malformed JSON line", f"f:1 ({exc.msg})")
            want = None
        assert repr(got) == repr(want) and ours.first_seen == theirs.first_seen, line


def _files(prefix):
    folder, base = os.path.split(prefix)
    return {f[len(base):]: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.startswith(base) and not f.endswith(".meta.json")}


class _WorkersOnly(pp.EncodePool):
    """The parent never encodes: every batch (of 3) goes to a worker."""
    started = []   # per pool: whether every worker started (so did some of the work)

    def __init__(self, *a, local=None, **k):
        super().__init__(*a, batch=3, **k)

    def close(self):
        _WorkersOnly.started.append(all(w.started for w in self.workers))
        super().close()


def _run(sample, corpus, fmt, prefix, monkeypatch, workers=1, threads=1, pool=pp.EncodePool):
    monkeypatch.setattr(pp, "threads_per_process", lambda processes: threads)
    monkeypatch.setattr(pp, "EncodePool", pool)
    report = pp.preprocess_files([str(corpus)], str(prefix), fmt, "sentencepiece", str(sample / "tokenizer.model"),
                                 image_root=str(sample / "mmc4" / "images"), append_eod=True, workers=workers,
                                 progress=False)
    return _files(str(prefix)), report.to_dict()


def test_threads_write_the_bytes_of_one_thread(sample, tmp_path, monkeypatch):
    """Text on three threads in this process and on three in each of two workers, with a
    malformed line, a record without text and an empty one among the records."""
    lines = open(sample / "text.jsonl").read().splitlines()
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("\n".join(lines[:3] + ["{not json", '{"text": 5}', '{"text": ""}'] + lines[3:] * 3) + "\n")
    one = _run(sample, corpus, "jsonl-text", tmp_path / "one", monkeypatch)
    assert one[1]["documents_written"] == 3 + 3 * (len(lines) - 3)
    assert one[1]["skipped"] == {"malformed JSON line": 1, "record without a string 'text'": 1, "empty document": 1}
    assert _run(sample, corpus, "jsonl-text", tmp_path / "threads", monkeypatch, threads=3) == one
    assert _run(sample, corpus, "jsonl-text", tmp_path / "workers", monkeypatch, workers=2, threads=3,
                pool=_WorkersOnly) == one
    assert _WorkersOnly.started[-1]


def test_workers_write_the_bytes_of_one_process(sample, tmp_path, monkeypatch):
    """MMC4 with a malformed line and a missing image among the records: two workers with the
    parent encoding while they start (a short input is all done before), and two workers
    doing every batch."""
    with zipfile.ZipFile(sample / "mmc4" / "docs_shard_0_v2.jsonl.zip") as zf:
        good = zf.read("docs_shard_0_v2.jsonl").decode().splitlines()
    doc = json.loads(good[1])
    missing = dict(doc, image_info=[dict(doc["image_info"][0], image_name="nope.jpg")])
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("\n".join(good[:5] + ["{not json", json.dumps(missing)] + good[5:]) + "\n")
    one = _run(sample, corpus, "mmc4", tmp_path / "one", monkeypatch)
    assert one[1]["documents_written"] == 13 and one[1]["skipped"] == {"malformed JSON line": 1,
                                                                        "image file missing": 1}
    assert _run(sample, corpus, "mmc4", tmp_path / "workers", monkeypatch, workers=2) == one
    assert _run(sample, corpus, "mmc4", tmp_path / "workers_only", monkeypatch, workers=2, pool=_WorkersOnly) == one
    assert _WorkersOnly.started[-1]

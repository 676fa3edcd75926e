"""Faults of the second reliability sweep in preprocessing and merging: each reproduced on tiny
data and checked against its fix (a counted, placed skip; a one-line error with its exit code;
no input replaced; no worker waited on forever; no temporary file left behind)."""

import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import sys
import time
import zipfile

import numpy as np
import pytest

from data_helpers import ROOT, run_tool
from megatron_vl.data.formats import Report, guarded
from megatron_vl.data.indexed import FeatureStoreWriter
from megatron_vl.data.preprocess import read_meta, table_fingerprint
from megatron_vl.errors import run_cli
from megatron_vl.testing import processes


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_pp")
    run_tool("tools/make_sample_data.py", "--output", str(d), "--documents", "4", "--pairs", "4", "--instruct", "4")
    return d


def tool(script, *args, expect=0):
    """tools/<script> run through run_cli in this process, as `python tools/<script>` runs it:
    (stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("_fault_" + script[:-3], os.path.join(ROOT, "tools", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(module.main, [str(a) for a in args])
    assert code == expect, f"{script} {args} exited {code}, expected {expect}:\n{out.getvalue()}{err.getvalue()}"
    return out.getvalue(), err.getvalue()


def preprocess(sample, fmt, inp, prefix, *extra, expect=0):
    return tool("preprocess_data.py", "--input-format", fmt, "--input", inp, "--output-prefix", prefix,
                "--tokenizer-model", sample / "tokenizer.model", "--no-progress", *extra, expect=expect)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def mmc4_lines(sample):
    with zipfile.ZipFile(sample / "mmc4" / "docs_shard_0_v2.jsonl.zip") as zf:
        return zf.read("docs_shard_0_v2.jsonl").decode().splitlines()


def leftovers(folder):
    return sorted(f for f in os.listdir(folder) if ".tmp" in f or f.endswith(".lock"))


# --- T: damaged streams and records of the wrong shape ------------------------------------------

def test_zip_member_with_bad_deflate_data_is_counted_not_a_traceback(sample, tmp_path):
    """P_corrupt: zlib.error is no OSError; the lines before the damage are kept."""
    import random
    rng = random.Random(0)   # varied text: zeroed bytes in it break the deflate stream itself
    words = ["red", "blue", "circle", "square", "above", "below", "the", "a"]
    lines = [json.dumps({"text_list": [" ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(20))],
                         "image_info": []}) for _ in range(300)]
    path = tmp_path / "corrupt.jsonl.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("corrupt.jsonl", "\n".join(lines) + "\n")
    raw = bytearray(path.read_bytes())
    at = len(raw) // 3
    raw[at:at + 40] = bytes(40)
    path.write_bytes(bytes(raw))
    out, _ = preprocess(sample, "mmc4", path, tmp_path / "c", "--image-root", sample / "mmc4" / "images")
    r = read_meta(f"{tmp_path}/c_text_document")["report"]
    assert r["skipped"]["damaged file, read up to the damage"] == 1
    assert r["first_seen"]["damaged file, read up to the damage"].startswith(
        f"{path}!corrupt.jsonl (error: Error -3 while decompressing data: invalid distance too far back")
    assert 0 < r["documents_written"] < len(lines)
    _, err = preprocess(sample, "mmc4", path, tmp_path / "cs", "--image-root", sample / "mmc4" / "images",
                        "--strict", expect=1)
    assert "damaged file, read up to the damage" in one_error_line(err)


def test_llava_and_coco_fields_of_the_wrong_type_are_counted_by_reason(sample, tmp_path):
    """I01 (`"image": [123]`), C01 (`"filepath": 7`) and their kind: no TypeError from a field."""
    img = sample / "llava" / "images"
    name = sorted(os.listdir(img))[0]
    good = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a square"}]
    records = [{"id": "ok", "image": name, "conversations": good},
               {"id": "imgint", "image": [123], "conversations": good},
               {"id": "imgdict", "image": {"a": 1}, "conversations": good},
               {"id": "fromlist", "conversations": [{"from": ["human"], "value": "hi"}, good[1]]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    out, _ = preprocess(sample, "llava", path, tmp_path / "l", "--image-root", img)
    reason = "image that is not a file name or a list of them"
    assert f"skipped ({reason}): 2  first at {path}:record 1 (id imgint): image [123]" in out
    assert f"skipped (turn of unknown role ['human']): 1  first at {path}:record 3" in out
    assert "documents written: 1" in out
    _, err = preprocess(sample, "llava", path, tmp_path / "ls", "--image-root", img, "--strict", expect=1)
    assert f"{path}:record 1 (id imgint): image [123]: {reason}" in one_error_line(err)

    coco = json.load(open(sample / "coco" / "dataset_coco.json"))
    coco["images"][0]["filepath"] = 7
    coco["images"][1]["sentences"] = 5
    cpath = tmp_path / "coco.json"
    cpath.write_text(json.dumps(coco))
    out, _ = preprocess(sample, "coco-captions", cpath, tmp_path / "c", "--image-root", sample / "coco")
    assert f"skipped (image entry whose filepath is not a string): 1  first at {cpath}:images[0] (filepath 7)" in out
    assert "skipped (image entry whose sentences is not a list): 1  first at " in out


def test_an_unforeseen_error_in_one_record_is_counted_with_its_place(sample, tmp_path, monkeypatch):
    """The class: whatever a record's fields do to the encoder, the run goes on, the record is
    counted as `malformed record (<exception>)` where it is; --strict makes it the error."""
    import megatron_vl.data.preprocess as pp
    real = pp.encode_document

    def flaky(doc, *a, **k):
        if doc.source.endswith(":2"):
            raise TypeError("unsupported operand type(s)")
        return real(doc, *a, **k)
    monkeypatch.setattr(pp, "encode_document", flaky)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)) + "\n")
    out, _ = preprocess(sample, "jsonl-text", path, tmp_path / "t")
    assert f"skipped (malformed record (TypeError: unsupported operand type(s))): 1  first at {path}:2" in out
    assert "documents written: 2" in out
    _, err = preprocess(sample, "jsonl-text", path, tmp_path / "ts", "--strict", expect=1)
    assert f"{path}:2: malformed record (TypeError" in one_error_line(err)
    # MEGATRON_VL_DEBUG=1: the bug itself comes through, for whoever looks for it.
    monkeypatch.setenv("MEGATRON_VL_DEBUG", "1")
    with pytest.raises(TypeError):
        guarded(Report(), "x", False, lambda: len(5))


# --- S: nothing placed or dropped unseen --------------------------------------------------------

def test_nan_matched_sim_does_not_pass_min_sim(sample, tmp_path):
    """P05b."""
    doc = json.loads(mmc4_lines(sample)[0])
    doc["image_info"] = [dict(doc["image_info"][0], matched_sim=float("nan"))]
    path = tmp_path / "nan.jsonl"
    path.write_text(json.dumps(doc) + "\n")   # json writes NaN, as the sweep's file had
    out, _ = preprocess(sample, "mmc4", path, tmp_path / "n", "--image-root", sample / "mmc4" / "images",
                        "--min-sim", "0.9")
    assert "images placed: 0" in out
    assert f"skipped (image whose matched_sim is NaN (cannot pass --min-sim)): 1  first at {path}:1 " in out


def test_negative_workers_or_partitions_are_refused(sample, tmp_path):
    """P18: one line, exit 2, nothing written."""
    path = sample / "text.jsonl"
    for flag in ("--workers", "--partitions"):
        _, err = preprocess(sample, "jsonl-text", path, tmp_path / "w", flag, "-3", expect=2)
        assert one_error_line(err) == f"error: {flag} -3: cannot be negative"
    assert os.listdir(tmp_path) == []


def _parquet(path, texts, images):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"texts": texts, "images": images}), path)
    return path


def test_obelics_texts_as_a_string_and_a_slot_with_text_and_image_are_counted(sample, tmp_path):
    """O_texts_string (one sentence per character before) and O_sameslot (image dropped unseen)."""
    jpg = (sample / "mmc4" / "images" / sorted(os.listdir(sample / "mmc4" / "images"))[0]).read_bytes()
    path = _parquet(tmp_path / "s.parquet", ["abc def", "hello"], [[None] * 7, [None] * 5])
    out, err = preprocess(sample, "obelics", path, tmp_path / "s", expect=1)
    assert f"skipped (texts/images not lists): 2  first at {path}:row 0 (texts str, images list)" in out
    assert "documents written: 0" in out
    # Every record skipped: an error naming the likely cause, not an empty dataset and exit 0.
    assert one_error_line(err) == (f"error: {tmp_path}/s_text_document: no document written: all 2 records were "
                                   f"skipped (most: texts/images not lists, 2, first at {path}:row 0 (texts str, "
                                   f"images list)); is --input-format obelics right for {path}?")
    _, err = preprocess(sample, "obelics", path, tmp_path / "s2", "--strict", expect=1)
    assert f"{path}:row 0 (texts str, images list): texts/images not lists" in one_error_line(err)

    path = _parquet(tmp_path / "same.parquet", [["caption", "next"]], [[jpg, None]])
    out, _ = preprocess(sample, "obelics", path, tmp_path / "m")
    assert f"skipped (slot with both a text and an image (image dropped)): 1  first at {path}:row 0 slot 0" in out
    assert "documents written: 1" in out
    preprocess(sample, "obelics", path, tmp_path / "m2", "--strict", expect=1)


def test_llava_image_tag_in_an_answer_and_turns_out_of_order_are_counted(sample, tmp_path):
    """I03 (tag removed and image lost before) and I04 (trained on a reply without a question)."""
    img = sample / "llava" / "images"
    name = sorted(os.listdir(img))[0]
    q, a = {"from": "human", "value": "What?"}, {"from": "gpt", "value": "a square"}
    records = [{"id": "ok", "conversations": [q, a]},
               {"id": "taggpt", "image": name, "conversations": [q, {"from": "gpt", "value": "<image>\nthis"}]},
               {"id": "gptfirst", "conversations": [{"from": "gpt", "value": "I speak first"}, q, a]},
               {"id": "twohuman", "conversations": [q, q, a]},
               {"id": "trailing", "conversations": [q, a, q]}]
    path = tmp_path / "l.json"
    path.write_text(json.dumps(records))
    out, _ = preprocess(sample, "llava", path, tmp_path / "l", "--image-root", img)
    assert f"skipped (<image> in an assistant turn): 1  first at {path}:record 1 (id taggpt): turn 1" in out
    order = "turns out of order (expected user, assistant, user, ...)"
    assert f"skipped ({order}): 3  first at {path}:record 2 (id gptfirst): turn 0 is the assistant's" in out
    assert "documents written: 1" in out
    _, err = preprocess(sample, "llava", path, tmp_path / "ls", "--image-root", img, "--strict", expect=1)
    assert "<image> in an assistant turn" in one_error_line(err)


def test_coco_splits_absent_from_the_file_are_refused_naming_those_present(sample, tmp_path):
    """C03: 0 documents and exit 0 before."""
    _, err = preprocess(sample, "coco-captions", sample / "coco" / "dataset_coco.json", tmp_path / "c",
                        "--image-root", sample / "coco", "--coco-splits", "nosuchsplit", expect=2)
    assert one_error_line(err) == (f"error: --coco-splits nosuchsplit: {sample}/coco/dataset_coco.json has none "
                                   "of them; its splits are train")


# --- D / S: merging -----------------------------------------------------------------------------

def _digest(prefix):
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(
        os.path.join(os.path.dirname(prefix), n) for n in os.listdir(os.path.dirname(prefix))
        if n.startswith(os.path.basename(prefix)))}


def _features(prefix):
    meta = read_meta(prefix)
    writer = FeatureStoreWriter(prefix + "_image_features", 2, 3, source=table_fingerprint(prefix, meta))
    for i in range(meta["num_images"]):
        writer.add(np.full((2, 3), i, np.float16))
    writer.finalize()


def test_merge_never_replaces_an_input_and_never_drops_features_silently(sample, tmp_path):
    """M02 (the first input replaced in place) and M04 (output silently without features)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for prefix in (a, b):
        preprocess(sample, "mmc4", sample / "mmc4" / "docs_shard_0_v2.jsonl.zip", prefix,
                   "--image-root", sample / "mmc4" / "images")
    a, b = f"{a}_text_document", f"{b}_text_document"
    before = _digest(a)
    _, err = tool("merge_datasets.py", "--input", a, b, "--output-prefix", a, expect=1)
    assert f"--output-prefix {a} is also an input of this run; choose another name" in one_error_line(err)
    assert _digest(a) == before
    # An input with a feature store beside one without: refused naming the one without.
    _features(a)
    out_prefix = str(tmp_path / "m")
    _, err = tool("merge_datasets.py", "--input", a, b, "--output-prefix", out_prefix, expect=2)
    assert one_error_line(err).startswith(f"error: {b} has no image feature store ({b}_image_features.idx) while "
                                          f"{a} has one")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("m")]
    out, _ = tool("merge_datasets.py", "--input", a, b, "--output-prefix", out_prefix, "--no-features")
    assert "note: --no-features: " in out and not os.path.exists(out_prefix + "_image_features.idx")
    # An existing output is replaced only with --overwrite.
    merged = _digest(out_prefix)
    _, err = tool("merge_datasets.py", "--input", b, a, "--output-prefix", out_prefix, "--no-features", expect=1)
    assert "pass --overwrite" in one_error_line(err) and _digest(out_prefix) == merged
    _features(b)
    tool("merge_datasets.py", "--input", b, a, "--output-prefix", out_prefix, "--overwrite")
    assert os.path.exists(out_prefix + "_image_features.idx")
    assert read_meta(out_prefix)["num_images"] == 2 * read_meta(a)["num_images"]


# --- ORPH: leftovers of dead writers; a full disk -----------------------------------------------

def _dead_pid():
    proc = processes.start_process(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_run_are_removed_by_the_next(sample, tmp_path):
    """K02: `P.bin.tmp<pid>` of a run killed with -9 stayed forever."""
    prefix = tmp_path / "k_text_document"
    dead, host = _dead_pid(), socket.gethostname()
    stale = [f"{prefix}.bin.tmp{dead}-{host}", f"{prefix}.idx.tmp{dead}", f"{prefix}_images.bin.tmp{dead}-{host}"]
    live = f"{prefix}.bin.tmp1-{host}"   # pid 1 is running: another writer's file is kept
    for f in stale + [live]:
        open(f, "wb").write(b"x" * 100)
    out, _ = preprocess(sample, "jsonl-text", sample / "text.jsonl", tmp_path / "k")
    for f in stale:
        assert f"note: removed {f}, a temporary file left by pid {dead} (no longer running)" in out
        assert not os.path.exists(f)
    assert os.path.exists(live)
    open(f"{tmp_path}/mm_text_document.bin.tmp{dead}", "wb").close()
    out, _ = tool("merge_datasets.py", "--input", prefix, "--output-prefix", f"{tmp_path}/mm_text_document")
    assert "note: removed " in out and not os.path.exists(f"{tmp_path}/mm_text_document.bin.tmp{dead}")


class _FullDisk(io.FileIO):
    """A file on a disk that fills after `room` bytes; closing it fails like a buffered file's
    flush of the bytes that did not fit (and still closes it)."""
    room = 64

    def write(self, data):
        if self.tell() + len(data) > self.room:
            self.unwritten = True
            raise OSError(errno.ENOSPC, "No space left on device", self.name)
        return super().write(data)

    def close(self):
        pending = getattr(self, "unwritten", False) and not self.closed
        super().close()
        if pending:
            raise OSError(errno.ENOSPC, "No space left on device", self.name)


def test_disk_full_is_one_line_and_leaves_no_temporary_files(sample, tmp_path, monkeypatch):
    """DF3: the writers' abort re-raised in close() and left their temporary files."""
    import megatron_vl.data.indexed as indexed
    monkeypatch.setattr(indexed, "open", lambda path, mode="r": _FullDisk(path, mode.replace("b", "")),
                        raising=False)
    _, err = preprocess(sample, "mmc4", sample / "mmc4" / "docs_shard_0_v2.jsonl.zip", tmp_path / "f",
                        "--image-root", sample / "mmc4" / "images", expect=1)
    assert one_error_line(err).startswith("error: no space left on the device writing ")
    assert os.listdir(tmp_path) == []


# --- G: a worker killed from outside; the parent killed ---------------------------------------

@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """Enough text for two workers to be busy for several seconds."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    line = json.dumps({"text": " ".join(["a red circle above a blue square"] * 60)}) + "\n"
    path.write_text(line * 20000)
    return path


def _start_busy_run(sample, big_jsonl, prefix):
    """preprocess_data.py --workers 2 in a process, returned once both workers are at work
    (tokens flowing into the output), not still starting: (process, its two workers)."""
    import psutil
    proc = processes.start_process([sys.executable, "tools/preprocess_data.py", "--input-format", "jsonl-text",
                                    "--input", big_jsonl, "--output-prefix", prefix, "--tokenizer-model",
                                    sample / "tokenizer.model", "--no-progress", "--workers", "2"],
                                   cwd=ROOT, capture=True, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    folder, deadline, workers = os.path.dirname(prefix), time.time() + 20, []
    while time.time() < deadline and proc.poll() is None:
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        written = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if ".bin.tmp" in f)
        if len(workers) == 2 and written > 200_000:
            break
        time.sleep(0.05)
    if len(workers) != 2 or proc.poll() is not None:
        proc.kill()
        raise AssertionError(f"the workers did not start: {proc.communicate()}")
    return proc, workers


def test_a_killed_worker_ends_the_run_with_a_line_not_a_hang(sample, big_jsonl, tmp_path):
    """H5: multiprocessing.Pool waited forever on a worker the OOM killer had ended, holding the lock."""
    prefix = tmp_path / "h"
    proc, workers = _start_busy_run(sample, big_jsonl, prefix)
    try:
        victim = workers[0].pid
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out + err
    msg = one_error_line(err)
    assert f"worker process {victim} killed by signal 9 (SIGKILL: likely the out-of-memory killer) while " \
           f"encoding {big_jsonl} (the batch from {big_jsonl}:" in msg
    assert leftovers(tmp_path) == [] and not os.path.exists(f"{prefix}_text_document.bin")
    assert not workers[1].is_running() or workers[1].status() == "zombie"


def test_after_kill_9_the_workers_end_and_the_next_run_removes_the_leftovers(sample, big_jsonl, tmp_path):
    """K02 as the sweep did it: the parent killed with -9 mid-run."""
    import psutil
    prefix = tmp_path / "k"
    proc, workers = _start_busy_run(sample, big_jsonl, prefix)
    proc.kill()
    proc.communicate()
    gone, alive = psutil.wait_procs(workers, timeout=10)   # they notice their parent is gone
    for w in alive:
        w.kill()
    assert not alive, "workers outlived their killed parent"
    left = leftovers(tmp_path)
    assert f"k_text_document.bin.tmp{proc.pid}-{socket.gethostname()}" in left and "k_text_document.lock" in left
    out, _ = preprocess(sample, "jsonl-text", sample / "text.jsonl", prefix)
    assert f"note: removed {tmp_path}/k_text_document.bin.tmp{proc.pid}-" in out
    assert leftovers(tmp_path) == []

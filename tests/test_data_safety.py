"""Nothing lost, nothing silently wrong: each data-safety fault found by trying the tools as a
new user would, reproduced on tiny data and checked against its fix."""

import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest

from data_helpers import ROOT, preprocess, run_tool
from megatron_vl.data.dataset import PackedDataset
from megatron_vl.data.indexed import FeatureStore, FeatureStoreWriter, IndexedDataError
from megatron_vl.data.packing import PackingConfig
from megatron_vl.data.preprocess import prefix_lock, read_meta, table_fingerprint


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    run_tool("tools/make_sample_data.py", "--output", str(d), "--documents", "6", "--pairs", "8")
    return d


def _jpeg(seed, size=32):
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _pairs_tar(path, pairs):
    """An img2dataset-style tar: [(key, caption bytes, jpeg bytes)]."""
    with tarfile.open(path, "w") as tf:
        for key, caption, image in pairs:
            for ext, data in (("jpg", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def _preprocess_pairs(sample, tar, prefix, *extra, expect=0):
    return run_tool("tools/preprocess_data.py", "--input-format", "wds-pairs", "--input", str(tar),
                    "--output-prefix", str(prefix), "--tokenizer-model", str(sample / "tokenizer.model"),
                    "--no-progress", *extra, expect=expect)


def _write_features(prefix, n_tokens=2, dim=3, fill=None):
    meta = read_meta(prefix)
    writer = FeatureStoreWriter(prefix + "_image_features", n_tokens, dim, source=table_fingerprint(prefix, meta))
    for i in range(meta["num_images"]):
        writer.add(np.full((n_tokens, dim), i if fill is None else fill, np.float16))
    writer.finalize()


def _leftovers(folder):
    return sorted(f for f in os.listdir(folder) if ".tmp" in f or f.endswith(".lock") or "_part" in f)


# --- 1. conversion never deletes what is not its own output -------------------------------

def test_convert_refuses_to_replace_anything_but_its_own_output(tmp_path):
    import importlib.util
    from helpers import tiny_hf_model
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools",
                                                                                     "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    hf_dir = tmp_path / "hf"
    tiny_hf_model().save_pretrained(hf_dir)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    before_hf = sorted(os.listdir(hf_dir))
    ckpt = tmp_path / "ckpt"

    def convert(*argv):   # as `python tools/convert_checkpoint.py` runs it: user errors are exit codes
        from megatron_vl.errors import run_cli
        return run_cli(tool.main, [str(a) for a in argv])

    assert convert("import-hf", "--hf-dir", hf_dir, "--save", project) == 1          # a project folder
    assert (project / "notes.txt").read_text() == "precious" and sorted(os.listdir(project)) == ["notes.txt"]
    assert convert("import-hf", "--hf-dir", hf_dir, "--save", hf_dir) == 1           # its own input
    assert convert("import-hf", "--hf-dir", hf_dir, "--save", tmp_path) == 1         # the input's parent
    assert sorted(os.listdir(hf_dir)) == before_hf
    assert convert("import-hf", "--hf-dir", hf_dir, "--save", ckpt) == 0
    assert convert("import-hf", "--hf-dir", hf_dir, "--save", ckpt, "--tensor-model-parallel-size", 2) == 0
    assert json.load(open(ckpt / "megatron_vl_checkpoint.json"))["tensor_model_parallel_size"] == 2  # replaced
    ckpt_files = sorted(os.listdir(ckpt))
    assert convert("export-hf", "--load", ckpt, "--save", ckpt) == 1                 # the checkpoint itself
    assert convert("export-hf", "--load", ckpt, "--save", tmp_path) == 1             # the checkpoint's parent
    assert convert("export-hf", "--load", ckpt, "--save", project) == 1
    assert sorted(os.listdir(ckpt)) == ckpt_files and (project / "notes.txt").exists()
    out = tmp_path / "export"
    assert convert("export-hf", "--load", ckpt, "--save", out) == 0
    assert convert("export-hf", "--load", ckpt, "--save", out) == 0                  # a re-export replaces
    assert convert("import-hf", "--hf-dir", out, "--save", out) == 1                 # an HF dir is not a release
    assert convert("import-hf", "--hf-dir", hf_dir, "--save", out) == 1              # nor replaced by one
    assert os.path.isfile(out / "config.json") and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_convert_refusal_message_names_the_directory(tmp_path):
    from megatron_vl.checkpoint.output_dir import check_output_dir
    from megatron_vl.checkpoint.layout import CheckpointError
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=rf"--save {tmp_path}: a non-empty directory that is not a previous "
                                              r"output; only a previous release output is replaced\. Nothing was "
                                              r"written or deleted"):
        check_output_dir(str(tmp_path), "release")


# --- 2. derived files are tied to the data they were made from ----------------------------

def test_reprocessing_a_prefix_invalidates_its_features_and_order_cache(sample, tmp_path, capsys):
    a = _pairs_tar(tmp_path / "a.tar", [(f"{i:05d}", b"a red circle above a blue square", _jpeg(i))
                                        for i in range(12)])
    b = _pairs_tar(tmp_path / "b.tar", [(f"{i:05d}", b"a green triangle below a yellow circle", _jpeg(100 + i))
                                        for i in range(12)])
    c = _pairs_tar(tmp_path / "c.tar", [(f"{i:05d}", b"a blue square", _jpeg(200 + i)) for i in range(5)])
    prefix = str(tmp_path / "data" / "p")
    p = prefix + "_text_document"
    cfg = PackingConfig(seq_length=16, num_image_tokens=2, embed_dim=3)
    _preprocess_pairs(sample, a, prefix)
    _write_features(p)
    first = PackedDataset(p, cfg, num_samples=4)
    # Same document count, other content: the features are refused by name, the old order cache is not read.
    log = _preprocess_pairs(sample, b, prefix)
    assert "note: " in log and "_image_features.* was made from the previous data" in log
    with pytest.raises(IndexedDataError, match=rf"{p}_image_features\.idx was computed from other data than "
                                               rf"{p}_image_table\.bin .*re-run tools/extract_image_features\.py"):
        PackedDataset(p, cfg, num_samples=4)
    _write_features(p, fill=7)
    second = PackedDataset(p, cfg, num_samples=4)
    fresh = PackedDataset(p, cfg, num_samples=4, cache_dir=str(tmp_path / "fresh_cache"))
    assert second._index_key(4) != first._index_key(4)
    for i in range(len(fresh)):
        assert all(np.array_equal(second[i][k], fresh[i][k]) for k in fresh[i])
    assert np.all(second[0]["features"][:second[0]["num_images"]] == 7)
    # Fewer images than the old store held (the old check let 12 stale rows pass for 5).
    meta_before = read_meta(p)
    _preprocess_pairs(sample, c, prefix)
    stale = FeatureStore(p + "_image_features")
    assert stale.count == 12 and read_meta(p)["num_images"] == 5 and meta_before["num_images"] == 12
    with pytest.raises(IndexedDataError, match="computed from other data"):
        PackedDataset(p, cfg, num_samples=2)
    # A damaged cache under the right name is rebuilt with a note naming it, never read.
    _write_features(p)
    ds = PackedDataset(p, cfg, num_samples=2)
    key = ds._index_key(2)
    doc_cache = os.path.join(os.path.dirname(p), f"{os.path.basename(p)}_{key}_doc.npy")
    before = np.array(ds.doc_order)
    np.save(doc_cache, np.array([0, 99], np.int64))
    capsys.readouterr()
    again = PackedDataset(p, cfg, num_samples=2)
    assert f"note: sample-order cache {doc_cache[:-8]}_*.npy does not match the checksums" in capsys.readouterr().out
    assert np.array_equal(again.doc_order, before)


# --- 3. images that do not decode ----------------------------------------------------------

def test_truncated_images_are_counted_and_never_reach_training(sample, tmp_path):
    good, cut = _jpeg(1, 64), _jpeg(2, 64)
    from PIL import Image
    with Image.open(io.BytesIO(cut[:len(cut) // 2])) as im:
        im.verify()   # what the landed check did: it passes a cut-short JPEG
    tar = _pairs_tar(tmp_path / "t.tar", [("00000", b"a red circle", good), ("00001", b"a cut image", cut[:len(cut) // 2]),
                                          ("00002", b"a blue square", _jpeg(3, 64))])
    log = _preprocess_pairs(sample, tar, tmp_path / "pp")
    assert "documents written: 3" in log and "images placed: 2" in log
    assert f"skipped (image unreadable): 1  first at {tar}:00001" in log
    # A table row that does not decode at extraction (written past preprocessing, as older data may be).
    from megatron_vl.data.features import extract_features
    from megatron_vl.data.formats import Report
    from megatron_vl.data.preprocess import DatasetWriter
    from megatron_vl.data.tokenizer import Tokenizer
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from data_helpers import make_tiny_clip
    tok = Tokenizer("sentencepiece", str(sample / "tokenizer.model"))
    p = str(tmp_path / "raw_text_document")
    writer = DatasetWriter(p, tok.meta(), multimodal=True)
    texts = ["a red circle above a square", "two shapes side by side", "a green triangle"]
    for d, images in enumerate([[good], [cut[:len(cut) // 2], good], [good]]):
        ids = tok.encode(texts[d])
        writer.add(ids, [(0, len(ids), img) for img in images])
    writer.finalize(Report(), {})
    clip = make_tiny_clip(str(tmp_path / "clip"))
    model = ImageTokenizer.from_clip(clip, ImageTokenizerConfig(num_tokens=2, embed_dim=3, num_heads=1)).eval()
    result = extract_features(p, model, load_image_processor(clip), batch_size=2, shard_size=2)
    assert result.count == 4 and len(result.undecodable) == 1
    assert result.undecodable[0].startswith(f"{p}_image_table.bin row 1 (document 1): ")
    store = FeatureStore(p + "_image_features")
    assert store.bad_rows.tolist() == [1] and not store.features[1].any() and store.features[2].any()
    assert _leftovers(tmp_path) == []
    ds = PackedDataset(p, PackingConfig(seq_length=16, num_image_tokens=2, embed_dim=3), num_samples=3)
    assert ds.dropped_images.tolist() == [1]
    seen = set()
    for j in range(len(ds.starts) - 1):
        s = ds.sample_in_order(j)
        seen.update(s["image_ids"][:s["num_images"]].tolist())
    assert 1 not in seen and {0, 2, 3} <= seen
    # The command-line tool says the same, with the place, and exits 0.
    os.remove(p + "_image_features.bin")
    os.remove(p + "_image_features.idx")
    out = run_tool("tools/extract_image_features.py", "--data-prefix", p, "--init-from-clip", clip,
                   "--num-image-tokens", "2", "--embed-dim", "3", "--tokenizer-heads", "1", "--no-progress")
    assert "skipped (image undecodable, its block dropped from training layouts): 1" in out
    assert f"{p}_image_table.bin row 1 (document 1): " in out


# --- 4. two runs on one prefix ---------------------------------------------------------------

def test_concurrent_preprocessing_of_one_prefix_is_refused(sample, tmp_path):
    prefix = tmp_path / "locked"
    target = f"{prefix}_text_document"
    with prefix_lock(target):
        log = preprocess(sample, "wds-pairs", prefix, expect=1, process=True)   # another process
    assert f"{target}.lock: dataset prefix {target} is in use by another run (host " in log
    assert f"pid {os.getpid()}" in log
    assert not os.path.exists(target + ".bin") and not os.path.exists(target + ".lock")
    # A lock whose owner died on this host is taken over.
    import socket
    from megatron_vl.testing import processes
    dead = processes.start_process(["true"])
    dead.wait()
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "-", "command": "-"}, open(target + ".lock", "w"))
    preprocess(sample, "wds-pairs", prefix)
    assert os.path.isfile(target + ".bin") and not os.path.exists(target + ".lock")


# --- 6, 7, 8. malformed records, bad UTF-8, damaged files ------------------------------------

def test_malformed_records_invalid_utf8_and_damaged_files_are_counted(sample, tmp_path):
    with zipfile.ZipFile(sample / "mmc4" / "docs_shard_0_v2.jsonl.zip") as zf:
        good = zf.read("docs_shard_0_v2.jsonl").splitlines()
    doc = json.loads(good[0])
    bad = [json.dumps(dict(doc, image_info="not a list")).encode(), json.dumps(dict(doc, image_info=[None])).encode(),
           b'{"text_list": ["caf\xe9 in latin-1"], "image_info": []}']
    lines = [good[0], *bad, good[1]]
    path = tmp_path / "shard.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    common = ["--input-format", "mmc4", "--image-root", str(sample / "mmc4" / "images"),
              "--tokenizer-model", str(sample / "tokenizer.model"), "--no-progress"]
    log = run_tool("tools/preprocess_data.py", "--input", str(path), "--output-prefix", str(tmp_path / "m"), *common)
    r = read_meta(f"{tmp_path}/m_text_document")["report"]
    malformed = "record with a malformed image_info (expected a list of objects with an image_name)"
    assert r["skipped"] == {malformed: 2, "invalid UTF-8": 1} and r["documents_written"] == 2
    assert r["first_seen"][malformed] == f"{path}:2" and r["first_seen"]["invalid UTF-8"] == f"{path}:4 (byte 19)"
    # A .jsonl.zip cut short: the lines before the damage are read, the damage is named.
    zpath = tmp_path / "cut.jsonl.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cut.jsonl", b"\n".join(good * 40) + b"\n")
    data = zpath.read_bytes()
    zpath.write_bytes(data[:len(data) // 2])
    log = run_tool("tools/preprocess_data.py", "--input", str(zpath), "--output-prefix", str(tmp_path / "z"), *common)
    r = read_meta(f"{tmp_path}/z_text_document")["report"]
    assert r["skipped"]["damaged file, read up to the damage"] == 1
    assert r["first_seen"]["damaged file, read up to the damage"].startswith(f"{zpath} (BadZipFile")
    assert 0 < r["documents_written"] < 40 * len(good)
    # A tar cut short and an empty tar: the good samples are kept, each damage counted by file.
    tar = _pairs_tar(tmp_path / "full.tar", [(f"{i:05d}", b"a red circle", _jpeg(i)) for i in range(6)])
    raw = open(tar, "rb").read()
    cut_tar, empty_tar = tmp_path / "cut.tar", tmp_path / "empty.tar"
    cut_tar.write_bytes(raw[:len(raw) // 2])
    empty_tar.write_bytes(b"")
    log = run_tool("tools/preprocess_data.py", "--input-format", "wds-pairs", "--input", str(cut_tar), str(empty_tar),
                   "--output-prefix", str(tmp_path / "w"), "--tokenizer-model", str(sample / "tokenizer.model"),
                   "--no-progress")
    assert "skipped (damaged file, read up to the damage): " in log
    r = read_meta(f"{tmp_path}/w_text_document")["report"]
    assert r["skipped"]["damaged file, read up to the damage"] >= 2 and 0 < r["documents_written"] < 6
    assert r["first_seen"]["damaged file, read up to the damage"].startswith(f"{cut_tar} (ReadError")
    # Nothing but damage: counted, and no empty dataset passed off as a result.
    only_empty = _preprocess_pairs(sample, empty_tar, tmp_path / "e", expect=1)
    assert f"skipped (damaged file, read up to the damage): 1  first at {empty_tar} (ReadError: empty file)" in only_empty
    assert f"error: {tmp_path}/e_text_document: no document written: all 1 records were skipped" in only_empty
    # --partitions with a failure in a later partition: no _part files left behind.
    strict = run_tool("tools/preprocess_data.py", "--input-format", "wds-pairs", "--input", str(tar), str(cut_tar),
                      "--output-prefix", str(tmp_path / "parts"), "--tokenizer-model", str(sample / "tokenizer.model"),
                      "--partitions", "2", "--strict", "--no-progress", expect=1)
    assert f"{cut_tar} (ReadError" in strict
    assert _leftovers(tmp_path) == [] and not [f for f in os.listdir(tmp_path) if f.startswith("parts")]

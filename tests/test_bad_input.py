"""Every bad input: a clear error naming file and record, or a counted, reported skip; and
no output left behind that a reader would take as complete."""

import json
import os
import zipfile

import numpy as np
import pytest

from data_helpers import make_tiny_clip, preprocess, run_tool
from megatron_vl.data.dataset import PackedDataset
from megatron_vl.data.indexed import FeatureStore, FeatureStoreWriter, IndexedDataError, IndexedDataset
from megatron_vl.data.packing import PackingConfig
from megatron_vl.data.preprocess import table_fingerprint


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    run_tool("tools/make_sample_data.py", "--output", str(d), "--documents", "6", "--pairs", "8")
    return d


def _mmc4_zip(sample, lines):
    path = sample / "mmc4" / "bad_shard.jsonl.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bad_shard.jsonl", "\n".join(lines) + "\n")
    return path


def _good_mmc4_lines(sample):
    with zipfile.ZipFile(sample / "mmc4" / "docs_shard_0_v2.jsonl.zip") as zf:
        return zf.read("docs_shard_0_v2.jsonl").decode().splitlines()


def _outputs(prefix):
    folder, base = os.path.split(str(prefix))
    return sorted(f for f in os.listdir(folder) if f.startswith(base)) if os.path.isdir(folder) else []


def test_mmc4_bad_records_are_counted_with_their_place(sample, tmp_path):
    good = _good_mmc4_lines(sample)
    doc = json.loads(good[0])
    missing = dict(doc, image_info=[dict(doc["image_info"][0], image_name="nope.jpg")])
    out_of_range = dict(doc, image_info=[dict(doc["image_info"][0], matched_text_index=99)])
    corrupt_name = "corrupt.jpg"
    (sample / "mmc4" / "images" / corrupt_name).write_bytes(b"\xff\xd8 this is not a jpeg")
    corrupt = dict(doc, image_info=[dict(doc["image_info"][0], image_name=corrupt_name)])
    empty = dict(doc, text_list=[], image_info=[])
    lines = [good[0], "{not json", json.dumps(missing), json.dumps(out_of_range), json.dumps(corrupt),
             json.dumps(empty), good[1]]
    path = _mmc4_zip(sample, lines)
    prefix = tmp_path / "out" / "mmc4"
    log = run_tool("tools/preprocess_data.py", "--input-format", "mmc4", "--input", str(path), "--image-root",
                   str(sample / "mmc4" / "images"), "--output-prefix", str(prefix), "--tokenizer-model",
                   str(sample / "tokenizer.model"), "--no-progress")
    meta = json.load(open(f"{prefix}_text_document.meta.json"))
    r = meta["report"]
    assert r["documents_read"] == 6 and r["documents_written"] == 5
    assert r["skipped"] == {"malformed JSON line": 1, "image file missing": 1, "matched_text_index out of range": 1,
                            "image unreadable": 1, "empty document": 1}
    assert r["first_seen"]["malformed JSON line"].startswith(f"{path}!bad_shard.jsonl:2 ")
    assert "bad_shard.jsonl:4 (index 99" in r["first_seen"]["matched_text_index out of range"]
    assert r["first_seen"]["image file missing"].endswith("nope.jpg")
    assert "skipped (image unreadable): 1" in log and "skipped (empty document): 1" in log
    # --strict: the first bad record is an error, and nothing is left behind.
    strict_prefix = tmp_path / "strict" / "mmc4"
    log = run_tool("tools/preprocess_data.py", "--input-format", "mmc4", "--input", str(path), "--image-root",
                   str(sample / "mmc4" / "images"), "--output-prefix", str(strict_prefix), "--tokenizer-model",
                   str(sample / "tokenizer.model"), "--no-progress", "--strict", expect=1)
    assert "bad_shard.jsonl:2" in log and "malformed JSON line" in log
    assert _outputs(strict_prefix) == []


def test_obelics_row_with_unequal_lists_and_unreadable_parquet(sample, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"texts": [["a red circle", None], ["one", "two"]],
                             "images": [[None, b"bytes"], [None]]}), path)
    prefix = tmp_path / "out" / "ob"
    preprocess_log = run_tool("tools/preprocess_data.py", "--input-format", "obelics", "--input", str(path),
                              "--output-prefix", str(prefix), "--tokenizer-model", str(sample / "tokenizer.model"),
                              "--no-progress")
    r = json.load(open(f"{prefix}_text_document.meta.json"))["report"]
    assert r["skipped"]["texts/images lists differ in length"] == 1
    assert r["first_seen"]["texts/images lists differ in length"] == f"{path}:row 1"
    assert r["skipped"]["image unreadable"] == 1          # b"bytes" is no image
    assert "documents written: 1" in preprocess_log
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 definitely not parquet")
    bad_prefix = tmp_path / "out2" / "ob"
    log = run_tool("tools/preprocess_data.py", "--input-format", "obelics", "--input", str(broken),
                   "--output-prefix", str(bad_prefix), "--tokenizer-model", str(sample / "tokenizer.model"),
                   "--no-progress", expect=1)
    assert f"{broken}: unreadable parquet file" in log
    assert _outputs(bad_prefix) == []


def test_truncated_bin_and_idx_name_file_and_sizes(sample, tmp_path):
    prefix = tmp_path / "t"
    preprocess(sample, "jsonl-text", prefix)
    p = f"{prefix}_text_document"
    data = open(p + ".bin", "rb").read()
    open(p + ".bin", "wb").write(data[:-6])
    with pytest.raises(IndexedDataError, match=rf"{p}\.bin: data size mismatch: the index describes {len(data)} "
                                               rf"bytes, found {len(data) - 6}"):
        IndexedDataset(p)
    open(p + ".bin", "wb").write(data)
    idx = open(p + ".idx", "rb").read()
    open(p + ".idx", "wb").write(idx[:-8])
    with pytest.raises(IndexedDataError, match=rf"{p}\.idx: index size mismatch: expected {len(idx)} bytes .* "
                                               rf"found {len(idx) - 8}"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(idx[:20])
    with pytest.raises(IndexedDataError, match=r"truncated index: expected at least 34 bytes, found 20"):
        IndexedDataset(p)


def test_feature_store_problems(sample, tmp_path):
    prefix = tmp_path / "p"
    preprocess(sample, "wds-pairs", prefix)
    p = f"{prefix}_text_document"
    source = table_fingerprint(p)
    writer = FeatureStoreWriter(p + "_image_features", 4, 6, source=source)
    writer.add(np.zeros((5, 4, 6)))          # the image table has 8 images
    writer.finalize()
    with pytest.raises(IndexedDataError, match=r"feature store holds 5 images, .*_image_table\.bin has 8"):
        PackedDataset(p, PackingConfig(seq_length=32, num_image_tokens=4), num_samples=2, cache_dir=str(tmp_path))
    open(p + "_image_features.bin", "ab").write(b"\x00\x00")
    with pytest.raises(IndexedDataError, match=r"_image_features\.bin: feature data size mismatch: expected 240 "
                                               r"bytes \(5 x \[4, 6\] float16\), found 242"):
        FeatureStore(p + "_image_features")
    writer = FeatureStoreWriter(p + "_image_features", 4, 6, source=source)
    writer.add(np.zeros((8, 4, 6)))
    writer.finalize()
    with pytest.raises(IndexedDataError, match=r"4 visual tokens per image, the run expects N = 32"):
        PackedDataset(p, PackingConfig(seq_length=64, num_image_tokens=32), num_samples=2, cache_dir=str(tmp_path))


def test_dataset_whose_tokenizer_lacks_image_tokens(sample, tmp_path):
    prefix = tmp_path / "p"
    preprocess(sample, "jsonl-text", prefix)
    meta_path = f"{prefix}_text_document.meta.json"
    meta = json.load(open(meta_path))
    del meta["tokenizer"]["image_token_ids"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"meta\.json: tokenizer lacks the \[IMG\] / \[/IMG\] special tokens"):
        PackedDataset(f"{prefix}_text_document", PackingConfig(seq_length=32, num_image_tokens=2), num_samples=2,
                      cache_dir=str(tmp_path))


def test_missing_tokenizer_and_input_are_clear_errors(sample, tmp_path):
    log = run_tool("tools/preprocess_data.py", "--input-format", "jsonl-text", "--input", str(sample / "text.jsonl"),
                   "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", str(tmp_path / "none.model"),
                   "--no-progress", expect=1)
    assert "none.model: cannot load sentencepiece model" in log
    log = run_tool("tools/preprocess_data.py", "--input-format", "jsonl-text", "--input", str(tmp_path / "nope*.jsonl"),
                   "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", str(sample / "tokenizer.model"),
                   expect=1)
    assert "no such file" in log
    assert _outputs(tmp_path / "x") == []


def test_workers_and_partitions_give_identical_datasets(sample, tmp_path):
    (sample / "pairs2").mkdir(exist_ok=True)
    import shutil
    shutil.copy(sample / "pairs" / "00000.tar", sample / "pairs2" / "00000.tar")
    shutil.copy(sample / "pairs" / "00000.tar", sample / "pairs2" / "00001.tar")
    common = ["tools/preprocess_data.py", "--input-format", "wds-pairs", "--input", str(sample / "pairs2" / "*.tar"),
              "--tokenizer-model", str(sample / "tokenizer.model"), "--no-progress"]
    run_tool(*common, "--output-prefix", str(tmp_path / "one"))
    run_tool(*common, "--output-prefix", str(tmp_path / "two"), "--workers", "2")
    log = run_tool(*common, "--output-prefix", str(tmp_path / "parts"), "--partitions", "2")
    assert "documents written: 16" in log
    for name in ("two", "parts"):
        for suffix in (".bin", ".idx", "_images.bin", "_images.idx", "_image_table.bin", "_image_table.idx"):
            a = open(f"{tmp_path}/one_text_document{suffix}", "rb").read()
            b = open(f"{tmp_path}/{name}_text_document{suffix}", "rb").read()
            assert a == b, (name, suffix)
    assert not [f for f in os.listdir(tmp_path) if "_part" in f]


class _FailingAfter(object):
    """The real image tokenizer, made to fail after a number of batches (an interruption)."""

    def __init__(self, model, batches):
        self.model, self.left, self.cfg, self.calls = model, batches, model.cfg, 0

    def __call__(self, pixels):
        self.calls += 1
        if self.left == 0:
            raise KeyboardInterrupt("simulated interruption")
        self.left -= 1
        return self.model(pixels)


def test_feature_extraction_resumes_after_interruption(sample, tmp_path):
    import torch
    from megatron_vl.data.features import extract_features
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    clip = make_tiny_clip(str(tmp_path / "clip"))
    model = ImageTokenizer.from_clip(clip, ImageTokenizerConfig(num_tokens=3, embed_dim=5, num_heads=2)).eval()
    model.save_pretrained(str(tmp_path / "tok"), load_image_processor(clip))
    reloaded = ImageTokenizer.from_pretrained(str(tmp_path / "tok")).eval()
    px = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(px), reloaded(px))
    processor = load_image_processor(str(tmp_path / "tok"))
    prefix = tmp_path / "p"
    preprocess(sample, "wds-pairs", prefix)
    p = f"{prefix}_text_document"
    extract_features(p, model, processor, batch_size=2, shard_size=4)
    reference = np.array(FeatureStore(p + "_image_features").features)
    os.remove(p + "_image_features.bin")
    os.remove(p + "_image_features.idx")
    interrupted = _FailingAfter(model, batches=3)   # shard 0 (2 batches) completes, shard 1 does not
    with pytest.raises(KeyboardInterrupt):
        extract_features(p, interrupted, processor, batch_size=2, shard_size=4)
    assert not os.path.exists(p + "_image_features.idx")
    resumed = _FailingAfter(model, batches=100)
    extract_features(p, resumed, processor, batch_size=2, shard_size=4)
    assert resumed.calls == 2                        # only shard 1 (images 4..7) was recomputed
    assert np.array_equal(np.array(FeatureStore(p + "_image_features").features), reference)

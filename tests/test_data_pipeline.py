"""make_sample_data -> preprocess_data (4 formats) -> extract_image_features -> packed samples."""

import json
import os
import struct

import numpy as np
import pytest

from data_helpers import make_tiny_clip, preprocess, run_tool
from megatron_vl.data.dataset import PackedDataset
from megatron_vl.data.indexed import FeatureStore, IndexedDataset
from megatron_vl.data.packing import IGNORE, PackingConfig, visual_sequence

N = 4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    sample = root / "sample"
    run_tool("tools/make_sample_data.py", "--output", str(sample), "--documents", "12", "--pairs", "40")
    out = {}
    for fmt in ("mmc4", "obelics", "wds-pairs", "jsonl-text"):
        log = preprocess(sample, fmt, root / "data" / fmt)
        out[fmt] = (str(root / "data" / f"{fmt}_text_document"), log)
    clip = make_tiny_clip(str(root / "clip"))
    prefixes = [out[f][0] for f in ("mmc4", "obelics", "wds-pairs")]
    log = run_tool("tools/extract_image_features.py", "--data-prefix", *prefixes, "--init-from-clip", clip,
                   "--num-image-tokens", str(N), "--embed-dim", "24", "--tokenizer-heads", "2", "--batch-size", "8",
                   "--shard-size", "16", "--save-image-tokenizer", str(root / "image_tokenizer"), "--no-progress")
    return {"root": root, "sample": sample, "prefix": {k: v[0] for k, v in out.items()},
            "logs": {k: v[1] for k, v in out.items()}, "extract_log": log, "clip": clip}


def test_reports_and_files(pipeline):
    for fmt, prefix in pipeline["prefix"].items():
        meta = json.load(open(prefix + ".meta.json"))
        log = pipeline["logs"][fmt]
        assert f"documents read: {meta['report']['documents_read']}" in log
        assert meta["report"]["skipped"] == {}, meta["report"]
        text = IndexedDataset(prefix)
        assert text.num_documents == meta["num_documents"] == (40 if fmt == "wds-pairs" else 12)
        assert text.dtype == np.uint16
        if fmt != "jsonl-text":
            assert meta["num_images"] == meta["report"]["images_placed"] > 0
            assert len(IndexedDataset(prefix + "_image_table")) == meta["num_images"]
            assert FeatureStore(prefix + "_image_features").shape == (N, 24)
            assert len(FeatureStore(prefix + "_image_features")) == meta["num_images"]
    assert "wds-pairs_text_document_image_features: 40 images x [4, 24] float16" in pipeline["extract_log"]


def test_idx_readable_by_independent_reader(pipeline):
    """A reader written here from the format description alone (Megatron's MMIDIDX)."""
    prefix = pipeline["prefix"]["mmc4"]
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert version == 1 and code == 8          # uint16
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
    assert len(raw) == 34 + 12 * n_seq + 8 * n_doc
    data = open(prefix + ".bin", "rb").read()
    assert pointers[0] == 0 and list(pointers[1:]) == list(np.cumsum(lengths[:-1]) * 2)
    assert docs[0] == 0 and docs[-1] == n_seq
    ours = IndexedDataset(prefix)
    for i in range(n_seq):
        ref = np.frombuffer(data, np.uint16, lengths[i], pointers[i])
        assert np.array_equal(ref, ours[i])


def test_jsonl_text_is_byte_identical_to_megatron(pipeline, tmp_path):
    """Megatron-LM's preprocess_data.py with GPTSentencePieceTokenizer: one sequence per
    document, encode(text) + [eos], written by megatron-core's own IndexedDatasetBuilder."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    sp = spm.SentencePieceProcessor(model_file=str(pipeline["sample"] / "tokenizer.model"))
    ref_prefix = str(tmp_path / "megatron_text_document")
    builder = IndexedDatasetBuilder(ref_prefix + ".bin", dtype=DType.optimal_dtype(sp.get_piece_size()))
    for line in open(pipeline["sample"] / "text.jsonl"):
        ids = sp.encode_as_ids(json.loads(line)["text"]) + [sp.eos_id()]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(ref_prefix + ".idx")
    ours = pipeline["prefix"]["jsonl-text"]
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref_prefix + ext, "rb").read(), ext


def _check_sample(s, cfg, img_id, img_end_id, next_first_token):
    S = cfg.seq_length
    tokens, labels, vis, reg = s["tokens"], s["labels"], s["visual_mask"], s["regression_mask"]
    assert tokens.shape == labels.shape == vis.shape == (S,)
    assert s["num_images"] <= cfg.max_images
    # Every image block is whole: [IMG], N visual positions, [/IMG].
    starts = np.flatnonzero(vis & (s["visual_index"] == 0))
    assert len(starts) == s["num_images"]
    for p in starts:
        assert p >= 1 and tokens[p - 1] == img_id and p + N < S and tokens[p + N] == img_end_id
        assert vis[p:p + N].all() and list(s["visual_index"][p:p + N]) == list(range(N))
    assert vis.sum() == N * s["num_images"]
    # The one rule: output t predicts element t+1 (the last filled position: the next
    # sample's first element); padding has no targets.
    fill = s["num_positions"]
    for t in range(S - 1):
        if t < fill - 1 and vis[t + 1]:
            assert reg[t] and labels[t] == IGNORE
        elif t < fill - 1:
            assert not reg[t] and labels[t] == tokens[t + 1]
        elif t == fill - 1:
            assert not reg[t] and labels[t] == next_first_token
        else:
            assert not reg[t] and labels[t] == IGNORE
    seq = visual_sequence(s)
    for j, image in enumerate(s["image_ids"][:s["num_images"]]):
        assert np.array_equal(seq[starts[j]:starts[j] + N], s["features"][j].astype(np.float32))


@pytest.mark.parametrize("fmt", ["mmc4", "obelics", "wds-pairs", "jsonl-text"])
def test_packed_samples_follow_the_rules(pipeline, fmt, tmp_path):
    cfg = PackingConfig(seq_length=64, num_image_tokens=N, max_images=2, seed=5)
    ds = PackedDataset(pipeline["prefix"][fmt], cfg, num_samples=40, cache_dir=str(tmp_path))
    assert len(ds) == 40
    for i in range(len(ds)):
        j = int(ds.shuffle[i])
        s = ds.sample_in_order(j)
        nxt = ds.sample_in_order(j + 1)["tokens"][0] if j + 1 < len(ds) else s["labels"][s["num_positions"] - 1]
        _check_sample(s, cfg, ds.img_id, ds.img_end_id, nxt)
        if fmt != "jsonl-text":
            feats = FeatureStore(pipeline["prefix"][fmt] + "_image_features")
            for j, image in enumerate(s["image_ids"][:s["num_images"]]):
                assert np.array_equal(s["features"][j], feats[int(image)])
    images = sum(ds[i]["num_images"] for i in range(len(ds)))
    assert images == 0 if fmt == "jsonl-text" else images > 20
    # The cached order is reused, and a fresh instance gives identical samples.
    again = PackedDataset(pipeline["prefix"][fmt], cfg, num_samples=40, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 5   # the three order arrays, their checksums, the data check's verdict
    for i in (0, 7, 39):
        assert all(np.array_equal(ds[i][k], again[i][k]) for k in ds[i])


def test_train_valid_test_blend(pipeline, tmp_path):
    from megatron_vl.data.dataset import build_train_valid_test
    p = pipeline["prefix"]
    cfg = PackingConfig(seq_length=64, num_image_tokens=N, max_images=5, seed=9, embed_dim=24)
    train, valid, test = build_train_valid_test(["0.5", p["mmc4"], "0.3", p["wds-pairs"], "0.2", p["jsonl-text"]],
                                                "80,20,0", cfg, (30, 6, 0), cache_dir=str(tmp_path))
    assert test is None and len(train) == 30 and len(valid) == 6
    assert list(np.bincount(train.dataset_index, minlength=3)) == [15, 9, 6]
    shapes = {train[i]["features"].shape for i in range(30)}
    assert shapes == {(5, N, 24)}   # text-only samples carry zero features of the same width
    # valid reads documents train never sees: the last 20% of each dataset.
    assert train.datasets[0].documents.max() < valid.datasets[0].documents.min()


def test_obelics_images_as_files_named_by_url_sha1_and_hf_tokenizer(pipeline, tmp_path):
    import hashlib
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    images = tmp_path / "images"
    images.mkdir()
    jpeg = (pipeline["sample"] / "mmc4" / "images" / sorted(os.listdir(pipeline["sample"] / "mmc4" / "images"))[0])
    url = "http://example.invalid/a.jpg"
    (images / (hashlib.sha1(url.encode()).hexdigest() + ".jpg")).write_bytes(jpeg.read_bytes())
    pq.write_table(pa.table({"texts": [["a red circle above a blue square", None, "the end"]],
                             "images": [[None, url, None]]}), tmp_path / "rows.parquet")
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a red circle above a blue square", "the end"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    hf_dir = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(hf_dir)
    out = run_tool("tools/preprocess_data.py", "--input-format", "obelics", "--input", str(tmp_path / "rows.parquet"),
                   "--image-root", str(images), "--output-prefix", str(tmp_path / "ob"), "--tokenizer-type", "hf",
                   "--tokenizer-model", str(hf_dir), "--append-eod", "--no-progress")
    assert "images placed: 1" in out
    meta = json.load(open(tmp_path / "ob_text_document.meta.json"))
    ids = meta["tokenizer"]["image_token_ids"]
    assert ids["[IMG]"] == raw.get_vocab_size() and ids["[/IMG]"] == ids["[IMG]"] + 1
    assert meta["tokenizer"]["eod_id"] == 2 and meta["tokenizer"]["vocab_size"] == raw.get_vocab_size() + 2
    spans = IndexedDataset(str(tmp_path / "ob_text_document_images"))[0]
    n_first = len(IndexedDataset(str(tmp_path / "ob_text_document"))[0]) - 1 - 2   # minus eod, "the end"
    assert list(spans) == [n_first, n_first + 2, 0]   # attached to the next text: "the end"


def test_merge_tool(pipeline, tmp_path):
    p = pipeline["prefix"]["wds-pairs"]
    out = run_tool("tools/merge_datasets.py", "--input", p, p, "--output-prefix", str(tmp_path / "merged"))
    assert "80 documents, 80 images" in out
    merged = IndexedDataset(str(tmp_path / "merged"))
    spans = IndexedDataset(str(tmp_path / "merged_images"))
    assert np.array_equal(merged[40], IndexedDataset(p)[0])
    assert spans[40][2] == 40   # image ids renumbered after the first part's 40 images
    merged_features = FeatureStore(str(tmp_path / "merged_image_features"))
    original = FeatureStore(p + "_image_features")
    assert len(merged_features) == 80 and np.array_equal(merged_features[40], original[0])
    cfg = PackingConfig(seq_length=64, num_image_tokens=N, seed=1)
    ds = PackedDataset(str(tmp_path / "merged"), cfg, num_samples=5, cache_dir=str(tmp_path))
    with pytest.raises(IndexError, match="sample 5 of a 5-sample dataset"):
        ds[5]

"""The paper's per-document sampling (megatron_vl/data/doc_sampling.py): the rule on
hand-built documents with exact windows, the choice's uniformity and stability, and one
preprocessing run (1 and 2 workers) checked file by file."""

import json
import os
import random
import zipfile
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from megatron_vl.data.doc_sampling import (DROPPED, NOT_CHOSEN, SENTENCE_CUT, TEXT_CUT, DocSampling, Window,
                                           choose_images, cut_document, document_identity, image_order, plan_window)
from megatron_vl.data.indexed import IndexedDataset
from megatron_vl.data.layout import read_meta, sidecar
from megatron_vl.data.records import DataUsageError, ImageRef, RawDocument, Report
from megatron_vl.data.tokenizer import Tokenizer
from megatron_vl.testing.scripts import run_tool
from megatron_vl.testing.tiny_data import preprocess

# Sentences of 5, 7, 3, 6, 4, 8, 5, 9 tokens after a BOS at 0: contiguous, as encode_document makes them.
LENGTHS = [5, 7, 3, 6, 4, 8, 5, 9]
SPANS = [(1 + sum(LENGTHS[:i]), 1 + sum(LENGTHS[:i + 1])) for i in range(len(LENGTHS))]
assert SPANS[0] == (1, 6) and SPANS[-1] == (39, 48)


def budget(k):   # subsequence 40, N = 2 (blocks of 4), BOS and EOD
    return DocSampling("paper", 5, 40, 2).budget(k, bos=True, eod=True)


def test_window_rule_on_a_constructed_document():
    assert [budget(k) for k in range(4)] == [38, 34, 30, 26]
    # Images on sentences 2 and 5: the window 13..34 (21 tokens) leaves 9 of 30; before it half
    # (4) takes no whole sentence (sentence 1 has 7), after it 9 takes sentence 6 (5) but not 7
    # (9 more); the before side then has 4 again: still none.
    assert plan_window(SPANS, [2, 5], budget) == Window(13, 39, 2)
    # By tokens: 4 before, 5 after.
    assert plan_window(SPANS, [2, 5], budget, whole_sentences=False) == Window(9, 39, 2)
    # Images on sentences 0, 3 and 7: 1..48 (47) is over budget(3) = 26: the last (sentence 7)
    # is dropped; 1..22 (21) fits budget(2) = 30; nothing lies before sentence 0, so the 9 go
    # after: sentence 4 (4) fits, sentence 5 (8 more) does not.
    assert plan_window(SPANS, [0, 3, 7], budget) == Window(1, 26, 2)
    # Room left at the document's start goes after it (tokens: 5 before is all there is, 8 after).
    assert plan_window(SPANS, [1], lambda k: 20, whole_sentences=False) == Window(1, 21, 1)
    assert plan_window(SPANS, [1], lambda k: 20) == Window(1, 16, 1)
    # ... and room left at its end goes before it.
    assert plan_window(SPANS, [7], lambda k: 20, whole_sentences=False) == Window(28, 48, 1)
    assert plan_window(SPANS, [7], lambda k: 20) == Window(34, 48, 1)
    # One sentence longer than the budget: its first tokens, the image kept.
    assert plan_window(SPANS, [7], lambda k: 6) == Window(39, 45, 1, sentence_cut=True)
    # Two chosen images on that sentence: the second is dropped first.
    assert plan_window(SPANS, [7, 7], lambda k: 10 - 2 * k) == Window(39, 47, 1, sentence_cut=True)
    # No image: the first budget(0) tokens; a short document whole.
    assert plan_window(SPANS, [], budget) == Window(1, 39, 0)
    assert plan_window(SPANS[:3], [], budget) == Window(1, 16, 0)


def _doc(image_sentences, source="/data/mmc4/shard_7.jsonl.zip!shard_7.jsonl:12"):
    sentences = [f"s{i}" for i in range(len(LENGTHS))]
    images = [(s, ImageRef(name=f"img{i}", data=f"image {i}".encode())) for i, s in enumerate(image_sentences)]
    return RawDocument(source, sentences, images)


def _read(ref):
    return (None, "image unreadable") if ref.data.startswith(b"bad") else (ref.data, None)


def test_cut_document_counts_what_it_leaves_out_and_points_into_the_cut_text():
    rule = DocSampling("paper", 3, 40, 2, seed=5)
    tokens = [1] + list(range(100, 147))     # BOS, then token 100 + i at position 1 + i
    doc = _doc([7, 0, 3, 5])                 # image 0 on the last sentence: record order is not document order
    order = image_order(5, document_identity(doc.source), 4)
    chosen = sorted(order[:3], key=lambda i: doc.images[i][0])
    report = Report()
    out, images, skips = cut_document(rule, doc, tokens, SPANS, _read, True, 2, report)
    window = plan_window(SPANS, [doc.images[i][0] for i in chosen], lambda k: rule.budget(k, True, True))
    assert skips == [] and report.cuts[NOT_CHOSEN] == 1
    assert report.cuts[DROPPED] == 3 - window.kept and window.kept >= 1
    assert out == [1] + tokens[window.start:window.end] + [2]
    assert len(out) + len(images) * 4 <= 40
    # Exactly the kept images, in document order, each span the tokens of its own sentence.
    assert [data for _, _, data in images] == [f"image {i}".encode() for i in chosen[:window.kept]]
    for (s, e, _), i in zip(images, chosen):
        a, b = SPANS[doc.images[i][0]]
        assert out[s:e] == tokens[a:b]
    assert report.first_seen[NOT_CHOSEN] == doc.source


def test_an_unreadable_image_gives_its_turn_to_the_next_in_order():
    doc = _doc([1, 2, 4, 6])
    order = image_order(0, document_identity(doc.source), 4)
    doc.images[order[0]] = (doc.images[order[0]][0], ImageRef(name="broken", data=b"bad"))
    report = Report()
    _, images, skips = cut_document(DocSampling("paper", 2, 200, 2), doc, [1] + list(range(100, 147)), SPANS,
                                    _read, True, 2, report)
    assert skips == [("image unreadable", "broken")]
    assert sorted(data for _, _, data in images) == sorted(f"image {i}".encode() for i in order[1:3])
    assert report.cuts == Counter({NOT_CHOSEN: 1})


def test_a_document_without_images_keeps_its_first_tokens_and_counts_the_cut():
    report = Report()
    rule = DocSampling("paper", 5, 20, 2)
    out, images, _ = cut_document(rule, _doc([]), [1] + list(range(100, 147)), SPANS, _read, True, 2, report)
    assert out == [1] + list(range(100, 118)) + [2] and images == [] and report.cuts == Counter({TEXT_CUT: 1})
    short = Report()
    out, _, _ = cut_document(rule, _doc([]), [1, 100, 101], [(1, 3)], _read, True, None, short)
    assert out == [1, 100, 101] and not short.cuts


def test_every_subsequence_fits_on_random_documents():
    """Any document, any choice: at most max images, at most L positions, each kept image's
    span exactly its sentence (or the cut sentence's first tokens), the text one slice."""
    rng = random.Random(0)
    seen = Counter()
    for trial in range(300):
        lengths = [rng.choice([rng.randint(0, 40), rng.randint(0, 40), 250]) for _ in range(rng.randint(1, 15))]
        lengths[0] = max(lengths[0], 1)
        spans = [(sum(lengths[:i]), sum(lengths[:i + 1])) for i in range(len(lengths))]
        tokens = list(range(1000, 1000 + spans[-1][1]))
        rule = DocSampling("paper", rng.randint(1, 6), rng.randint(60, 300), rng.choice([2, 8]), seed=trial)
        eod = rng.choice([None, 2])
        doc = RawDocument(f"f.jsonl:{trial}", ["x"] * len(lengths),
                          [(rng.randrange(len(lengths)), ImageRef(name="i", data=bytes([j])))
                           for j in range(rng.randint(0, 12))])
        report = Report()
        out, images, _ = cut_document(rule, doc, tokens, spans, _read, False, eod, report)
        assert len(out) + len(images) * (rule.num_image_tokens + 2) <= rule.subsequence_length
        assert len(images) <= rule.max_images_per_doc and len(images) == min(len(doc.images), rule.max_images_per_doc) \
            - report.cuts[DROPPED]
        seen.update(report.cuts)
        text = out[:-1] if eod else out
        assert text == tokens[text[0] - 1000:text[-1] - 1000 + 1] if text else True
        sentences = [doc.images[data[0]][0] for _, _, data in images]
        assert sentences == sorted(sentences)
        for (s, e, data) in images:
            a, b = spans[doc.images[data[0]][0]]
            assert 0 <= s <= e <= len(text)
            if report.cuts[SENTENCE_CUT]:
                assert out[s:e] == tokens[a:a + e - s] and e == len(text) and s == 0
            else:
                assert out[s:e] == tokens[a:b]
    assert all(seen[reason] for reason in (NOT_CHOSEN, DROPPED, SENTENCE_CUT, TEXT_CUT)), seen


def test_the_choice_is_uniform_over_a_12_image_document():
    counts = Counter()
    for seed in range(1200):
        chosen = choose_images(seed, "docs_shard_0_v2.jsonl.zip!docs_shard_0_v2.jsonl:3", 12, 5, lambda i: True)
        assert len({i for i, _ in chosen}) == 5
        counts.update(i for i, _ in chosen)
    observed = [counts[i] for i in range(12)]
    assert min(observed) > 0 and sum(observed) == 6000
    assert chisquare(observed).pvalue > 1e-3, observed     # 500 expected each
    # The order is a permutation, drawn afresh per document as well as per seed.
    assert sorted(image_order(0, "a:1", 12)) == list(range(12))
    assert image_order(0, "a:1", 12) != image_order(0, "a:2", 12) != image_order(1, "a:1", 12)


def test_the_identity_ignores_the_directory_only():
    assert document_identity("/data/mmc4/docs_shard_3_v2.jsonl.zip!docs_shard_3_v2.jsonl:17") == \
        document_identity("mmc4/docs_shard_3_v2.jsonl.zip!docs_shard_3_v2.jsonl:17") == \
        "docs_shard_3_v2.jsonl.zip!docs_shard_3_v2.jsonl:17"
    assert document_identity("/o/train-00001-of-01335.parquet:row 4") == "train-00001-of-01335.parquet:row 4"
    assert document_identity("x.jsonl:3") == "x.jsonl:3" != document_identity("x.jsonl:4")


def test_settings_that_cannot_work_are_refused():
    DocSampling("pack").check("wds-pairs", True, True)     # pack mode: any format
    with pytest.raises(DataUsageError, match="--input-format wds-pairs is not interleaved documents"):
        DocSampling("paper").check("wds-pairs", True, True)
    with pytest.raises(DataUsageError, match=r"--subsequence-length 171: no room for text .* 172 needed"):
        DocSampling("paper", 5, 171, 32).check("mmc4", False, True)
    DocSampling("paper", 5, 172, 32).check("mmc4", False, True)
    with pytest.raises(DataUsageError, match="--max-images-per-doc 0: must be at least 1"):
        DocSampling("paper", 0)


# --- one preprocessing run, 1 and 2 workers --------------------------------------------------------

L, N, MOST = 48, 8, 2
PAPER = ["--prepend-bos", "--doc-sampling", "paper", "--max-images-per-doc", str(MOST), "--subsequence-length",
         str(L), "--num-image-tokens", str(N), "--seed", "3"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("doc_sampling")
    run_tool("tools/make_sample_data.py", "--output", str(d), "--documents", "10", "--pairs", "1", "--instruct", "0")
    return d


def _files(prefix):
    return {kind: open(path + ext, "rb").read() for kind, path in
            (("text", prefix), ("images", sidecar(prefix, "images")), ("table", sidecar(prefix, "table")))
            for ext in (".bin", ".idx")}


def test_preprocessing_keeps_only_the_chosen_images_and_their_sentences(sample, tmp_path):
    out = preprocess(sample, "mmc4", tmp_path / "one", *PAPER)
    preprocess(sample, "mmc4", tmp_path / "two", *PAPER, "--workers", "2", "--strict")
    one, two = f"{tmp_path}/one_text_document", f"{tmp_path}/two_text_document"
    # The same choice on any worker count, byte for byte; what the rule cuts is no error under --strict.
    assert _files(one) == _files(two)
    meta = read_meta(one)
    assert meta["doc_sampling"] == {"mode": "paper", "max_images_per_doc": MOST, "subsequence_length": L,
                                    "num_image_tokens": N, "seed": 3}
    with zipfile.ZipFile(f"{sample}/mmc4/docs_shard_0_v2.jsonl.zip") as zf:
        records = [json.loads(line) for line in zf.read("docs_shard_0_v2.jsonl").decode().splitlines()]
    text, spans = IndexedDataset(one), IndexedDataset(sidecar(one, "images"))
    table = IndexedDataset(sidecar(one, "table"))
    tok = Tokenizer("sentencepiece", f"{sample}/tokenizer.model")
    assert text.num_documents == len(records) == 10
    placed = 0
    for d, rec in enumerate(records):
        tokens, triples = list(text[d]), np.asarray(spans[d]).reshape(-1, 3)
        assert len(tokens) + len(triples) * (N + 2) <= L and len(triples) <= MOST
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eod_id
        files = {open(f"{sample}/mmc4/images/{info['image_name']}", "rb").read(): info["matched_text_index"]
                 for info in rec["image_info"]}
        for s, e, image in triples:
            sentence = files[bytes(np.asarray(table[image], np.uint8))]   # one of this document's images ...
            assert tokens[s:e] == tok.encode(rec["text_list"][sentence])  # ... with its sentence's tokens
        placed += len(triples)
    assert table.num_documents == meta["num_images"] == meta["report"]["images_placed"] == placed
    # Every input image is accounted for: placed, not chosen, or dropped for the length.
    cuts = meta["report"]["cuts"]
    assert placed + cuts[NOT_CHOSEN] + cuts.get(DROPPED, 0) == sum(len(r["image_info"]) for r in records)
    assert cuts[NOT_CHOSEN] > 0 and cuts[DROPPED] > 0, cuts      # the sample exercises both
    assert f"cut ({DROPPED}): {cuts[DROPPED]}  first at " in out


def test_the_tool_refuses_what_paper_mode_cannot_do(sample, tmp_path):
    out = preprocess(sample, "wds-pairs", tmp_path / "p", "--doc-sampling", "paper", expect=2)
    assert "--input-format wds-pairs is not interleaved documents" in out
    out = preprocess(sample, "mmc4", tmp_path / "m", "--max-images-per-doc", "3", expect=2)
    assert "--max-images-per-doc is read by --doc-sampling paper only" in out
    assert not os.path.exists(f"{tmp_path}/m_text_document.bin")


def test_paper_mode_data_is_read_one_whole_subsequence_at_a_time(sample, tmp_path):
    from megatron_vl.data.dataset import PackedDataset
    from megatron_vl.data.indexed import IndexedDataError
    from megatron_vl.data.packing import PackingConfig
    from megatron_vl.data.indexed import FeatureStoreWriter
    from megatron_vl.data.layout import table_fingerprint
    preprocess(sample, "mmc4", tmp_path / "m", *PAPER)
    prefix = f"{tmp_path}/m_text_document"
    features = FeatureStoreWriter(sidecar(prefix, "features"), N, 3, source=table_fingerprint(prefix))
    for _ in range(read_meta(prefix)["num_images"]):
        features.add(np.zeros((N, 3), np.float16))
    features.finalize()
    cfg = PackingConfig(seq_length=2 * L, num_image_tokens=N, max_images=2 * MOST, seed=1,
                        reset_attention_mask=True)
    ds = PackedDataset(prefix, cfg, num_samples=12, cache_dir=str(tmp_path))
    assert ds.cfg.whole_documents and not ds.notes
    lengths = {d: int(ds.doc_tokens[d]) + (len(ds.spans[d]) // 3) * (N + 2) for d in range(10)}
    rows_with_two = 0
    for i in range(len(ds)):
        sample_ = ds[i]
        segments = sample_["segment_ids"][:sample_["num_positions"]]
        rows_with_two += int(segments.max()) >= 1
        # Every segment is one whole subsequence: its length is some document's laid-out length.
        for seg in np.unique(segments):
            assert int((segments == seg).sum()) in lengths.values()
    assert rows_with_two > 0        # short subsequences share a row
    with pytest.raises(IndexedDataError, match=f"{prefix}.meta.json: .*N = {N}"):
        PackedDataset(prefix, PackingConfig(seq_length=2 * L, num_image_tokens=N + 1), num_samples=4,
                      cache_dir=str(tmp_path))


def test_partitions_merge_to_the_one_run_output(sample, tmp_path):
    shard = f"{sample}/mmc4/docs_shard_0_v2.jsonl.zip"
    preprocess(sample, "mmc4", tmp_path / "one", *PAPER, "--input", shard, shard)
    preprocess(sample, "mmc4", tmp_path / "two", *PAPER, "--input", shard, shard, "--partitions", "2")
    one, two = f"{tmp_path}/one_text_document", f"{tmp_path}/two_text_document"
    assert _files(one) == _files(two)
    m1, m2 = read_meta(one), read_meta(two)
    assert m2["doc_sampling"] == m1["doc_sampling"] and m2["doc_sampling"]["mode"] == "paper"
    assert m2["report"]["cuts"] == m1["report"]["cuts"] and m1["report"]["cuts"][NOT_CHOSEN] > 0


def test_the_examples_preprocess_interleaved_data_by_the_papers_rule():
    """MMC4 and OBELICS are cut by the paper's rule in every example, with the N the 7.5B
    preset trains with (test_examples.py checks the flags parse)."""
    import re

    import yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    calls = []
    for name in ("preprocess_mmc4.sh", "preprocess_obelics.sh", "quickstart.sh"):
        script = open(os.path.join(root, "examples", name)).read().replace("\\\n", " ")
        calls += [line for line in script.splitlines()
                  if re.search(r"preprocess_data\.py --input-format (mmc4|obelics)", line)]
        if name != "quickstart.sh":
            assert "N=${N:-32}" in script and '--num-image-tokens "$N"' in script
    assert len(calls) == 4 and all("--doc-sampling paper" in c for c in calls), calls
    preset = yaml.safe_load(open(os.path.join(root, "examples/configs/vlgpt-7.5b.yaml")))
    assert (preset["data"]["num_image_tokens"], preset["model"]["seq_length"]) == (32, 512)

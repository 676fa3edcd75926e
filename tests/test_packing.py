"""Packing on hand-built documents with exact expectations; order, blends, resume."""

import numpy as np
import pytest

from megatron_vl.data.dataset import BlendedDataset, PackedDataset, PretrainingSampler, parse_blend, split_ranges
from megatron_vl.data.formats import Report
from megatron_vl.data.indexed import FeatureStoreWriter
from megatron_vl.data.packing import IGNORE, PackingConfig, coin_after, laid_out_document
from megatron_vl.data.preprocess import DatasetWriter, table_fingerprint
from megatron_vl.testing.distributed import run_distributed

IMG, END, EOD = 100, 101, 2
TOKENIZER = {"type": "test", "model": "-", "vocab_size": 102, "eod_id": EOD,
             "image_token_ids": {"[IMG]": IMG, "[/IMG]": END}}
DOCS = [  # (tokens, [(start, end, image)])
    (list(range(10, 20)), [(2, 5, 0), (5, 10, 1)]),
    (list(range(20, 26)), []),
    (list(range(30, 34)), [(0, 4, 2)]),
]


def write_dataset(prefix, docs=DOCS, n_tokens=2, dim=3):
    writer = DatasetWriter(str(prefix), TOKENIZER, multimodal=True)
    n_images = 0
    for tokens, spans in docs:
        writer.add(tokens, [(s, e, b"x") for s, e, _ in spans])
        n_images += len(spans)
    writer.finalize(Report(), {})
    feats = FeatureStoreWriter(str(prefix) + "_image_features", n_tokens, dim, source=table_fingerprint(str(prefix)))
    for i in range(n_images):   # image i's features are all i + 0.5 * position
        feats.add(np.full((n_tokens, dim), i, np.float16) + np.arange(n_tokens, dtype=np.float16)[:, None] * 0.5)
    feats.finalize()
    return str(prefix)


def test_layout_places_each_image_before_or_after_its_sentence():
    cfg = PackingConfig(seq_length=16, num_image_tokens=2, seed=7)
    tokens = np.arange(10, 20)
    spans = np.array([2, 5, 0, 5, 10, 1])
    for position in range(6):
        after = coin_after(7, np.array([position, position]), np.array([0, 1]))
        toks, imgs, vis, _ = laid_out_document(tokens, spans, cfg, position, IMG, END)
        block = lambda i: [IMG, 0, 0, END]  # noqa: E731
        pos0, pos1 = (5 if after[0] else 2), (10 if after[1] else 5)
        expect = list(range(10, 10 + pos0)) + block(0) + list(range(10 + pos0, 10 + pos1)) + block(1) + \
            list(range(10 + pos1, 20))
        assert list(toks) == expect
        assert list(imgs[imgs >= 0]) == [0, 0, 1, 1]
        assert list(vis[vis >= 0]) == [0, 1, 0, 1]
    # Both choices occur: the coin is not constant.
    coins = coin_after(7, np.arange(200), np.zeros(200, int))
    assert 60 < coins.sum() < 140


def test_samples_are_exact_and_never_split_an_image(tmp_path):
    prefix = write_dataset(tmp_path / "hand")
    cfg = PackingConfig(seq_length=9, num_image_tokens=2, max_images=5, seed=3)
    ds = PackedDataset(prefix, cfg, num_samples=6, cache_dir=str(tmp_path))
    stream = []   # the laid-out stream in document order, to compare samples against
    for k, d in enumerate(ds.doc_order[:9]):
        doc_tokens, doc_spans, mask = ds._get_doc(int(d))
        toks, imgs, vis, _ = laid_out_document(doc_tokens, doc_spans, cfg, k, IMG, END, mask)
        stream += [(int(t), int(i), int(v), k) for t, i, v in zip(toks, imgs, vis)]
    pos = 0
    for j in range(6):
        s = ds.sample_in_order(j)
        fill = s["num_positions"]
        chunk = stream[pos:pos + fill]
        assert [c[0] if c[1] < 0 else 0 for c in chunk] == list(s["tokens"][:fill])
        assert [c[1] >= 0 for c in chunk] == list(s["visual_mask"][:fill])
        if fill < 9:   # ended early only because the next image block would not fit
            assert stream[pos + fill][0] == IMG and fill + 4 > 9
            assert list(s["tokens"][fill:]) == [0] * (9 - fill) and (s["labels"][fill:] == IGNORE).all()
        # Targets: text -> next token, visual -> regression onto the next embedding.
        for t in range(fill):
            nxt = stream[pos + t + 1]
            if nxt[1] >= 0:
                assert s["regression_mask"][t] and s["labels"][t] == IGNORE
            else:
                assert not s["regression_mask"][t] and s["labels"][t] == nxt[0]
        # Segments follow documents (the padding is a segment of its own).
        docs_here = [c[3] for c in chunk]
        assert list(np.unique(s["segment_ids"][:fill], return_inverse=True)[1]) == \
            list(np.unique(docs_here, return_inverse=True)[1])
        pos += fill
    # Visual inputs are the stored features of the right image, in order.
    for j in range(6):
        s = ds.sample_in_order(j)
        for slot, image in enumerate(s["image_ids"][:s["num_images"]]):
            assert np.array_equal(s["features"][slot], np.full((2, 3), image, np.float16) +
                                  np.array([[0], [0.5]], np.float16))


def test_at_most_max_images_per_sample(tmp_path):
    prefix = write_dataset(tmp_path / "hand")
    cfg = PackingConfig(seq_length=64, num_image_tokens=2, max_images=1, seed=1)
    ds = PackedDataset(prefix, cfg, num_samples=5, cache_dir=str(tmp_path))
    counts = [ds.sample_in_order(j)["num_images"] for j in range(5)]
    assert max(counts) == 1 and sum(counts) >= 4


def test_image_block_longer_than_sample_is_refused(tmp_path):
    prefix = write_dataset(tmp_path / "hand", n_tokens=4)
    with pytest.raises(ValueError, match=r"an image block \(6 positions\) does not fit in --seq-length 5"):
        PackedDataset(prefix, PackingConfig(seq_length=5, num_image_tokens=4), num_samples=2, cache_dir=str(tmp_path))


def test_zero_images_per_sample_is_refused(tmp_path):
    prefix = write_dataset(tmp_path / "hand")
    with pytest.raises(ValueError, match="max images per sample must be >= 1, got 0"):
        PackedDataset(prefix, PackingConfig(seq_length=16, num_image_tokens=2, max_images=0), num_samples=2,
                      cache_dir=str(tmp_path))


def test_reset_position_ids_restart_per_document(tmp_path):
    prefix = write_dataset(tmp_path / "hand")
    cfg = PackingConfig(seq_length=40, num_image_tokens=2, seed=2, reset_position_ids=True)
    s = PackedDataset(prefix, cfg, num_samples=1, cache_dir=str(tmp_path)).sample_in_order(0)
    for seg in np.unique(s["segment_ids"]):
        where = np.flatnonzero(s["segment_ids"] == seg)
        assert list(s["position_ids"][where]) == list(range(len(where)))


def _samples_digest(rank, world, prefix, cache):
    import hashlib
    cfg = PackingConfig(seq_length=9, num_image_tokens=2, seed=11)
    ds = PackedDataset(prefix, cfg, num_samples=20, cache_dir=cache)
    h = hashlib.sha256()
    for i in range(len(ds)):
        for k, v in sorted(ds[i].items()):
            h.update(np.asarray(v).tobytes())
    return h.hexdigest()


def test_same_samples_in_every_process(tmp_path):
    prefix = write_dataset(tmp_path / "hand")
    cache = str(tmp_path / "cache")
    digests = run_distributed(_samples_digest, 2, prefix, cache, timeout=120)
    assert digests[0] == digests[1] == _samples_digest(0, 1, prefix, cache)


def test_sampler_resumes_with_any_data_parallel_size():
    whole = [i for b in PretrainingSampler(48, 0, 2, 0, 1) for i in b]
    assert whole == list(range(48))
    # dp=4: a global batch of 8 is split in rank order; resuming at 16 consumed continues at 16.
    batches = {r: list(PretrainingSampler(48, 16, 2, r, 4)) for r in range(4)}
    assert batches[0][0] == [16, 17] and batches[3][0] == [22, 23] and batches[0][1] == [24, 25]
    seen = sorted(i for r in range(4) for b in batches[r] for i in b)
    assert seen == list(range(16, 48))


def test_blend_follows_weights_and_megatron_syntax():
    assert parse_blend(["0.5", "a", "0.3", "b", "0.2", "c"]) == (["a", "b", "c"], [0.5, 0.3, 0.2])
    assert parse_blend(["only"]) == (["only"], [1.0])
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_blend(["0.5", "a", "b"])
    blend = BlendedDataset([list(range(1000)), list(range(1000, 2000)), list(range(2000, 3000))], [0.5, 0.3, 0.2], 100)
    counts = np.bincount(blend.dataset_index, minlength=3)
    assert list(counts) == [50, 30, 20]
    for prefix_len in (10, 37, 73):
        c = np.bincount(blend.dataset_index[:prefix_len], minlength=3)
        assert np.abs(c - np.array([0.5, 0.3, 0.2]) * prefix_len).max() <= 1.0
    assert blend[0] in range(1000) and len({blend[i] for i in range(100)}) == 100


def test_split_ranges():
    assert split_ranges("98,2,0", 100) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges("1", 10) == [(0, 10), (10, 10), (10, 10)]


def test_packing_config_from_flags():
    from megatron_vl.config import load_config
    from megatron_vl.data.packing import packing_config
    cfg, _ = load_config(["--seq-length", "256", "--num-image-tokens", "16", "--max-images-per-sample", "3",
                          "--seed", "9", "--reset-position-ids", "--eod-mask-loss"])
    assert packing_config(cfg) == PackingConfig(seq_length=256, num_image_tokens=16, max_images=3, seed=9,
                                                reset_position_ids=True, reset_attention_mask=True,
                                                eod_mask_loss=True)

"""The compiled sample index (data/sample_index.py) against the readable reference
(packing.build_sample_starts): the same rows, exactly, over random corpora and settings."""

import numpy as np
import pytest

from megatron_vl.data.packing import PackingConfig, build_sample_starts
from megatron_vl.data.sample_index import SampleIndexBuilder, SpanTable, build_sample_starts_fast

pytestmark = pytest.mark.timeout(300)


def _corpus(rng, documents):
    """(tokens per document, triples, images per document): spans in random sentence order,
    empty spans (conversation images) and documents without images included."""
    tokens = rng.integers(0, 300, documents)
    per = rng.integers(0, 7, documents)
    triples, image = [], 0
    for d in range(documents):
        for _ in range(per[d]):
            s = int(rng.integers(0, tokens[d] + 1))
            e = s if rng.random() < 0.2 else int(rng.integers(s, tokens[d] + 1))
            triples.append((s, e, image))
            image += 1
    return tokens, np.array(triples, np.int64).reshape(-1, 3), per


def _reference_spans(triples, per, dropped):
    first = np.concatenate([[0], np.cumsum(per)])

    def spans(d):
        t = triples[first[d]:first[d + 1]]
        return t[~np.isin(t[:, 2], dropped)].reshape(-1)
    return spans


def test_same_rows_as_reference_over_random_corpora():
    rng = np.random.default_rng(0)
    for trial in range(150):
        documents = int(rng.integers(1, 50))
        tokens, triples, per = _corpus(rng, documents)
        dropped = rng.choice(len(triples), size=min(len(triples), int(rng.integers(0, 3))), replace=False)
        cfg = PackingConfig(seq_length=int(rng.integers(16, 160)), num_image_tokens=int(rng.integers(1, 14)),
                            max_images=int(rng.integers(1, 5)), seed=int(rng.integers(0, 2**62)),
                            pack_documents=bool(rng.integers(0, 2)))
        epochs = [rng.permutation(documents) for _ in range(3)]
        order = np.concatenate(epochs)
        wanted = int(rng.integers(1, 300))
        ref = build_sample_starts(order, tokens, _reference_spans(triples, per, dropped), cfg, wanted)
        table = SpanTable.from_triples(triples, per, dropped)
        fast = build_sample_starts_fast(order, tokens, table, cfg, wanted)
        assert fast.dtype == np.int64 and np.array_equal(ref, fast), f"trial {trial}: {cfg}"
        # Epoch by epoch: a sample straddling the seam continues where the last one stopped.
        builder = SampleIndexBuilder(tokens, table, cfg)
        for part in epochs:
            builder.extend(part, wanted + 1)
        assert np.array_equal(ref, builder.starts), f"trial {trial} (extended by epochs)"
        assert builder.finished == (len(ref) == wanted + 1)


def test_rows_grow_past_the_first_guess_and_switch_to_int64_past_2_31():
    rng = np.random.default_rng(1)
    tokens, triples, per = _corpus(rng, 400)
    # One image per sample: far more rows than the elements suggest, so the kernel runs out of
    # room mid-chunk and the rows grow.
    cfg = PackingConfig(seq_length=200, num_image_tokens=1, max_images=1, seed=5)
    order = rng.permutation(400)
    ref = build_sample_starts(order, tokens, _reference_spans(triples, per, []), cfg, 1 << 40)
    builder = SampleIndexBuilder(tokens, SpanTable.from_triples(triples, per), cfg)
    builder.extend(order)          # no limit: grown as it goes, from 1,024 rows
    assert len(ref) > 1024 and np.array_equal(builder.starts, ref)
    # Positions in a very long order no longer fit int32: the rows widen, values stay exact
    # (text only, so that no coin depends on the shifted positions).
    text_only = SpanTable.empty(400)
    ref = build_sample_starts(order, tokens, lambda d: np.zeros(0, np.int64), cfg, 1 << 40)
    builder = SampleIndexBuilder(tokens, text_only, cfg)
    builder.order_length = 2**31 - 100
    builder.extend(order)
    assert builder.starts.dtype == np.int64
    shifted = ref.copy()
    shifted[1:, 0] += 2**31 - 100
    assert np.array_equal(builder.starts[1:], shifted[1:])

def test_span_table_from_the_images_sidecar(tmp_path):
    """The table read from a real P_images sidecar (IndexedDataset) with undecodable images
    left out, as PackedDataset reads it."""
    from megatron_vl.data.indexed import IndexedDataset, IndexedDatasetWriter
    rng = np.random.default_rng(2)
    tokens, triples, per = _corpus(rng, 30)
    writer = IndexedDatasetWriter(str(tmp_path / "x_images"), np.int64)
    first = np.concatenate([[0], np.cumsum(per)])
    for d in range(30):
        writer.add_item(triples[first[d]:first[d + 1]].reshape(-1))
        writer.end_document()
    writer.finalize()
    dropped = np.array([1, 7, 8])
    table = SpanTable.from_indexed(IndexedDataset(str(tmp_path / "x_images")), dropped)
    spans = _reference_spans(triples, per, dropped)
    for d in range(30):
        want = spans(d).reshape(-1, 3)[:, :2]
        assert np.array_equal(table.pairs[table.lo[d]:table.hi[d]], want), d

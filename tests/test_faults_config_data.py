"""Reliability sweep 2, configuration and training data: every bad flag value and every damaged,
mismatched or stale data file is one line naming the flag or the file (and record), never a
library traceback or a silent run; instruction conversations are never split across samples."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from megatron_vl.config import Config, ConfigError, load_config, range_errors, validate
from megatron_vl.data.dataset import PackedDataset, build_train_valid_test, open_meta, parse_blend
from megatron_vl.data.formats import Report
from megatron_vl.data.indexed import FeatureStoreWriter, IndexedDataError
from megatron_vl.data.packing import IGNORE, PackingConfig, build_sample_starts
from megatron_vl.data.preprocess import DatasetWriter, table_fingerprint
from megatron_vl.data.sample_index import SpanTable, build_sample_starts_fast
from megatron_vl.errors import InputError, UsageError, UserError
from pretrain_helpers import EMBED_DIM, NUM_IMAGE_TOKENS, VOCAB, pretrain_in_process, tiny_args

IMG, END = 256, 257
TOKENIZER = {"type": "test", "model": "-", "vocab_size": VOCAB, "eod_id": 2,
             "image_token_ids": {"[IMG]": IMG, "[/IMG]": END}}


def write_prefix(prefix, documents=12, seed=0, loss_mask=False, lengths=None, features=True):
    """A multimodal dataset of `documents` documents (tokens < 256, one or two images each)
    with an N x d feature store; loss_mask: instruction data (answers = the second half)."""
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(str(prefix), TOKENIZER, multimodal=True, loss_mask=loss_mask)
    n_images = 0
    for d in range(documents):
        n = int(lengths[d]) if lengths is not None else int(rng.integers(20, 60))
        tokens = rng.integers(3, 256, n)
        cut = int(rng.integers(1, n))
        images = [(0, cut, b"img")] + ([(cut, n, b"img2")] if d % 2 else [])
        mask = [0] * (n // 2) + [1] * (n - n // 2) + [0] * len(images) if loss_mask else None
        writer.add(tokens, images, mask)
        n_images += len(images)
    writer.finalize(Report(), {})
    if features:
        store = FeatureStoreWriter(str(prefix) + "_image_features", NUM_IMAGE_TOKENS, EMBED_DIM,
                                   source=table_fingerprint(str(prefix)))
        store.add(rng.standard_normal((n_images, NUM_IMAGE_TOKENS, EMBED_DIM)))
        store.finalize()
    return str(prefix)


CFG = PackingConfig(seq_length=64, num_image_tokens=NUM_IMAGE_TOKENS, max_images=3, seed=1, embed_dim=EMBED_DIM)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_prefix(root / "clean" / "d"), root


def copy_prefix(prefix, dest):
    os.makedirs(dest, exist_ok=True)
    folder, base = os.path.split(prefix)
    for f in os.listdir(folder):
        if f.startswith(base) and not f.endswith((".npy", "_check.json", "_order.json")):
            shutil.copy(os.path.join(folder, f), dest)
    return os.path.join(dest, base)


# --- flags (F08, F18, F09, F13, F20, F22, F23, F27): ranges declared with each field -----------

def _error(argv, world=1):
    cfg, _ = load_config([str(a) for a in argv])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world)
    return str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch-size", 0, "--global-batch-size", 0], "--micro-batch-size 0: must be >= 1"),   # F18
    (["--split", "abc"], "--split 'abc': expected up to three non-negative numbers with a positive sum"),  # F08
    (["--split", "1,2,3,4"], "--split '1,2,3,4': expected up to three"),
    (["--split", "0,0,0"], "--split '0,0,0': expected"),
    (["--seq-length", 256, "--max-position-embeddings", 128],
     "--max-position-embeddings (128) is below --seq-length (256)"),                                # F09
    (["--lr", -1], "--lr -1.0: must be >= 0"),                                                      # F13
    (["--num-workers", -1], "--num-workers -1: must be >= 0"),                                      # F27
    (["--max-images-per-sample", 0], "--max-images-per-sample 0: must be >= 1"),                    # F23
    (["--seq-length", 16, "--num-image-tokens", 32], "--seq-length (16) is shorter than one image block"),  # F22
    (["--attention-dropout", 1.0], "--attention-dropout 1.0: must be >= 0 and < 1"),
    (["--eval-shots", 0, -2], "--eval-shots -2: must be >= 0"),
])
def test_bad_flag_values_are_named(argv, message):
    assert message in _error(argv)


def test_every_declared_range_is_checked():
    """The class, not the case: each field declared with a range refuses a value outside it,
    naming its flag, in every entry point's config (stage 1's shares the sections)."""
    from megatron_vl.stage1.config import TokenizerTrainConfig
    checked = 0
    for config_cls in (Config, TokenizerTrainConfig):
        for section in dataclasses.fields(config_cls):
            for f in dataclasses.fields(section.default_factory()):
                low, above = f.metadata.get("low"), f.metadata.get("above")
                if low is None and above is None:
                    continue
                cfg = config_cls()
                bad = (low if low is not None else above) - 1
                setattr(getattr(cfg, section.name), f.name, [bad] if isinstance(getattr(
                    getattr(cfg, section.name), f.name), list) else bad)
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                assert any(e.startswith(f"{flag} {bad!r}: must be") for e in range_errors(cfg)), flag
                checked += 1
    assert checked > 60
    assert range_errors(Config()) == [] and range_errors(TokenizerTrainConfig()) == []


def test_save_that_is_a_file_is_refused(tmp_path):                                              # F20
    path = tmp_path / "ckpt"
    path.write_text("not a directory")
    assert f"--save {path}: is a file, not a directory" in _error(["--save", path])


def test_odd_data_paths_and_weights(data, tmp_path):                                             # F05, F06, F24
    prefix, _ = data
    for bad, message in ((["0.5", prefix, "0.5"], "expected one prefix, or weight/prefix pairs"),
                         (["x", prefix, "y", prefix], "expected one prefix, or weight/prefix pairs"),
                         (["-1", prefix, "2", prefix], "weights must be non-negative with a positive sum"),
                         (["0", prefix, "0", prefix], "weights must be non-negative with a positive sum")):
        with pytest.raises(ConfigError, match=message):
            parse_blend(bad)
    with pytest.raises(InputError, match=rf"{tmp_path}/nothing: no dataset there \(.*\.idx, \.bin and \.meta\.json"):
        open_meta(str(tmp_path / "nothing"))


# --- damaged or mismatched files (B01-B08, B10, B11, S01, F14, F16) -----------------------------

def _open(prefix, tmp_path, cfg=CFG, **kw):
    return PackedDataset(prefix, cfg, num_samples=8, cache_dir=str(tmp_path / "cache"), **kw)


def _damage_error(prefix, tmp_path, cfg=CFG):
    with pytest.raises(UserError) as info:
        _open(prefix, tmp_path, cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_damaged_files_are_one_line_naming_the_file(data, tmp_path):
    prefix, _ = data
    other = write_prefix(tmp_path / "other" / "d", documents=9, seed=5)
    cases = {
        "bin truncated": (lambda p: open(p + ".bin", "r+b").truncate(10), r"\.bin: data size mismatch"),
        "idx truncated": (lambda p: open(p + ".idx", "r+b").truncate(40), r"\.idx: index size mismatch"),
        "bad magic": (lambda p: open(p + ".idx", "r+b").write(b"XXXX"), r"\.idx: not an MMIDIDX index"),
        "other .bin": (lambda p: shutil.copy(other + ".bin", p + ".bin"), r"\.bin: data size mismatch"),
        "idx missing": (lambda p: os.remove(p + ".idx"), r"\.idx: file not found"),
        "meta missing": (lambda p: os.remove(p + ".meta.json"), r"\.meta\.json: dataset metadata missing"),
        "features truncated": (lambda p: open(p + "_image_features.bin", "r+b").truncate(100),
                               r"_image_features\.bin: feature data size mismatch"),
        "features missing": (lambda p: os.remove(p + "_image_features.idx"), r"_image_features\.idx: file not found"),
    }
    for name, (damage, message) in cases.items():
        p = copy_prefix(prefix, tmp_path / name.replace(" ", "_"))
        damage(p)
        assert __import__("re").search(message, _damage_error(p, tmp_path)), name
    cfg = dataclasses.replace(CFG, num_image_tokens=4)                                           # F14
    assert "visual tokens per image, the run expects N = 4" in _damage_error(prefix, tmp_path, cfg)
    empty = str(tmp_path / "empty" / "d")                                                        # F16
    DatasetWriter(empty, TOKENIZER, multimodal=False).finalize(Report(), {})
    with pytest.raises(InputError, match=r"the dataset holds no documents"):
        build_train_valid_test([empty], "98,2,0", CFG, (4, 0, 0), str(tmp_path / "cache"))


def test_garbage_in_the_image_spans_names_file_and_document(data, tmp_path, monkeypatch):      # B10
    prefix, _ = data
    p = copy_prefix(prefix, tmp_path / "spans")
    with open(p + "_images.bin", "r+b") as fh:
        fh.seek(8)
        fh.write(np.random.default_rng(3).bytes(56))
    message = _damage_error(p, tmp_path)
    assert f"{p}_images.bin: document 0" in message and f"{p}.bin" in message
    # Files too big to hash at start-up are still checked span by span when the order is built.
    import megatron_vl.data.dataset as dataset
    monkeypatch.setattr(dataset, "VERIFY_FINGERPRINT_BYTES", 0)
    message = _damage_error(p, tmp_path)
    assert f"{p}_images.bin: document 0, image " in message and "lies outside the document's" in message


def test_token_ids_beyond_the_vocabulary(data, tmp_path, monkeypatch, capsys):                         # B11
    prefix, _ = data
    for value in (65535, VOCAB + 42):
        p = copy_prefix(prefix, tmp_path / f"ids{value}")
        tokens = np.memmap(p + ".bin", np.uint16, mode="r+")
        tokens[::7] = value
        tokens.flush()
        del tokens
        assert (f"{p}.bin: token id {value} (the largest, in document 0) is outside the tokenizer's "
                f"{VOCAB}-token vocabulary") in _damage_error(p, tmp_path)
    # Through the entry script: one line, exit 1.
    code, out = pretrain_in_process(tiny_args(p, "--seq-length", 64, iters=1), monkeypatch, capsys)
    assert code == 1 and f"error: {p}.bin: token id {VOCAB + 42}" in out and "Traceback" not in out


def test_token_files_from_another_preprocessing_run(data, tmp_path, monkeypatch):             # S01
    prefix, _ = data
    p = copy_prefix(prefix, tmp_path / "stale")
    _open(p, tmp_path)                         # order caches built for the original files
    shorter = write_prefix(tmp_path / "alt" / "d", seed=0, lengths=None, features=False)
    # Same documents with one token fewer each (as without --append-eod): replace .bin/.idx only.
    from megatron_vl.data.indexed import IndexedDataset, IndexedDatasetWriter
    src, w = IndexedDataset(shorter), IndexedDatasetWriter(str(tmp_path / "alt" / "short"), np.uint16)
    for d in range(src.num_documents):
        w.add_document([np.asarray(src[d])[:-1]])
    w.finalize()
    for ext in (".bin", ".idx"):
        shutil.copy(str(tmp_path / "alt" / "short") + ext, p + ext)
    assert f"{p}.bin/.idx do not match the fingerprint {p}.meta.json records" in _damage_error(p, tmp_path)
    # Without hashing (big files): the stale order cache is not reused, the spans are checked.
    import megatron_vl.data.dataset as dataset
    monkeypatch.setattr(dataset, "VERIFY_FINGERPRINT_BYTES", 0)
    message = _damage_error(p, tmp_path)
    assert f"{p}_images.bin: document" in message and f"in {p}.bin" in message
    # A different document count is named against meta.json and the sidecars.
    w = IndexedDatasetWriter(p, np.uint16)
    w.add_document([[5, 6, 7]])
    w.finalize()
    assert f"{p}.idx holds 1 documents, {p}.meta.json records 12" in _damage_error(p, tmp_path)


# --- order caches (S03, S04, S05) ---------------------------------------------------------------

def test_damaged_order_caches_are_rebuilt_with_a_note(data, tmp_path, capsys):
    prefix, _ = data
    p = copy_prefix(prefix, tmp_path / "caches")
    first = _open(p, tmp_path)
    expect = [first[i]["tokens"].copy() for i in range(len(first))]
    base = os.path.join(tmp_path / "cache", f"d_{first._index_key(8)}")
    damages = {
        "truncated": lambda f: open(f, "r+b").truncate(os.path.getsize(f) // 2),              # S03
        "out of range": lambda f: np.save(f, np.full(np.load(f).shape, 10**9, np.int64)),      # S04
        "zeroed": lambda f: np.save(f, np.zeros(np.load(f).shape, np.int64)),                  # S05
    }
    for name, damage in damages.items():
        damage(base + "_shuffle.npy")
        capsys.readouterr()
        again = _open(p, tmp_path)
        out = capsys.readouterr().out
        assert f"note: sample-order cache {base}_*.npy " in out and "rebuilding it" in out, name
        assert [again[i]["tokens"].tolist() for i in range(len(again))] == [t.tolist() for t in expect], name
    # A cache that is intact is read as it is, with no note.
    _open(p, tmp_path)
    assert "note" not in capsys.readouterr().out


# --- instruction data: conversations never split (FI11) -----------------------------------------

def test_long_conversations_are_truncated_and_counted(tmp_path, capsys):
    lengths = [30, 120, 25, 70, 10, 300, 40, 20]
    p = write_prefix(tmp_path / "ins" / "d", documents=len(lengths), loss_mask=True, lengths=lengths)
    block = NUM_IMAGE_TOKENS + 2
    for pack in (False, True):
        cfg = dataclasses.replace(CFG, pack_documents=pack, reset_attention_mask=True)
        ds = PackedDataset(p, cfg, num_samples=20, cache_dir=str(tmp_path / "c"))
        laid = np.array(lengths) + np.array([1 + d % 2 for d in range(len(lengths))]) * block
        if not pack:   # one conversation per sample: those that train nothing have no label at all
            untrained = sum(bool((ds.sample_in_order(j)["labels"] == IGNORE).all()) for j in range(len(lengths)))
            assert untrained == 2
        # Counted by how each is cut (test_whole_turns.py checks the cuts themselves).
        assert ds.truncated == {"whole turns": 1, "first answer cut": 0, "no answer": untrained}
        assert ds.notes == [f"{p} (documents 0:8): {int((laid > 64).sum())} of 8 conversations longer than "
                            "--seq-length 64 (or with more than --max-images-per-sample 3 images), each kept alone in "
                            "one sample: 1 cut after their last whole turn that fits (later turns not trained); "
                            f"{untrained} cut before their first answer (nothing of them is trained)"]
        for j in range(len(ds)):
            s = ds.sample_in_order(j)
            # Every sample starts at a conversation's start; no image block is cut.
            assert tuple(ds.starts[j]) == (ds.starts[j][0], 0)
            n = s["num_positions"]
            assert n <= 64 and s["num_images"] <= 3
            assert s["visual_mask"][:n].sum() == s["num_images"] * NUM_IMAGE_TOKENS
            if not pack:
                assert len(set(s["segment_ids"][:n].tolist())) == 1
            assert s["labels"][n - 1] == IGNORE
    # Through the run's data set-up: the count is printed at start-up.
    from megatron_vl.training.data import build_data
    cfg, _ = load_config(tiny_args(p, "--seq-length", 64, "--split", "100,0,0", "--eval-interval", 1, iters=2))
    capsys.readouterr()
    build_data(cfg, 1)
    out = capsys.readouterr().out
    assert f"note: {p} (documents 0:8): 3 of 8 conversations longer than --seq-length 64" in out
    # A --seq-length that leaves no conversation an answer would train on nothing: refused.
    q = write_prefix(tmp_path / "ins2" / "d", documents=3, loss_mask=True, lengths=[200, 180, 220])
    with pytest.raises(ConfigError, match=rf"--seq-length 64: no conversation of {q} \(documents 0:3\) has an answer "
                       r"within one sample \(the earliest answer starts at position \d+\): nothing would be trained"):
        PackedDataset(q, CFG, num_samples=4, cache_dir=str(tmp_path / "c"))
    # F07: no validation documents, so no evaluation: said once at start-up.
    assert "note: --split 100,0,0 leaves no validation documents: no evaluation every --eval-interval 1" in out


def test_whole_document_packing_reference_and_compiled_agree():
    rng = np.random.default_rng(4)
    for trial in range(60):
        documents = int(rng.integers(1, 30))
        tokens = rng.integers(0, 200, documents)
        per = rng.integers(0, 4, documents)
        triples = np.array([(0, t, i) for i, t in enumerate(np.repeat(tokens, per))], np.int64).reshape(-1, 3)
        cfg = PackingConfig(seq_length=int(rng.integers(20, 120)), num_image_tokens=int(rng.integers(1, 8)),
                            max_images=int(rng.integers(1, 4)), seed=trial, pack_documents=bool(rng.integers(0, 2)),
                            whole_documents=True)
        order = np.concatenate([rng.permutation(documents) for _ in range(3)])
        first = np.concatenate([[0], np.cumsum(per)])
        ref = build_sample_starts(order, tokens, lambda d: triples[first[d]:first[d + 1]].reshape(-1), cfg, 40)
        fast = build_sample_starts_fast(order, tokens, SpanTable.from_triples(triples, per), cfg, 40)
        assert np.array_equal(ref, fast), trial
        assert (ref[:, 1] == 0).all()


# --- a user error inside a loader worker stays one line -----------------------------------------

class _Broken:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise IndexedDataError(f"/data/x_images.bin: document {i}: damaged")


def test_loader_worker_errors_stay_one_line():
    from megatron_vl.training.data import loader
    cfg = Config()
    cfg.data.num_workers = 1
    with pytest.raises(IndexedDataError) as info:
        next(loader(_Broken(), cfg, 0, 0, 1))
    assert str(info.value) == "/data/x_images.bin: document 0: damaged"


def test_usage_errors_exit_2_in_one_line(data, monkeypatch, capsys):                          # F18 end to end
    prefix, _ = data
    code, out = pretrain_in_process(tiny_args(prefix, "--micro-batch-size", 0, "--global-batch-size", 0), monkeypatch,
                                    capsys)
    assert code == 2 and "--micro-batch-size 0: must be >= 1" in out and "Traceback" not in out
    assert issubclass(ConfigError, UsageError)


# --- token ids at corpus scale: recorded by the writer, O(1) at start-up, per document on read --

def _meta(prefix):
    import json
    with open(prefix + ".meta.json") as fh:
        return json.load(fh)


def _set_meta(prefix, **fields):
    import json
    meta = _meta(prefix)
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    with open(prefix + ".meta.json", "w") as fh:
        json.dump(meta, fh)


def test_token_id_range_is_recorded_by_the_writers(data, tmp_path):
    from megatron_vl.data.indexed import IndexedDataset
    from megatron_vl.data.preprocess import merge_datasets
    prefix, _ = data
    tokens = np.asarray(IndexedDataset(prefix)._bin)
    assert _meta(prefix)["token_ids"] == {"min": int(tokens.min()), "max": int(tokens.max())}
    # A merge records the range of what it copied, inputs from before the record included.
    old = copy_prefix(write_prefix(tmp_path / "hi" / "d", documents=3, seed=9, features=False), tmp_path / "old")
    with open(old + ".bin", "r+b") as fh:   # (an id the vocabulary holds: IMG's)
        fh.write(np.uint16(IMG).tobytes())
    _set_meta(old, token_ids=None)
    merged = merge_datasets([prefix, old], str(tmp_path / "merged" / "d"), features=False)
    assert merged["token_ids"] == {"min": int(tokens.min()), "max": IMG}
    # A range outside the vocabulary is refused at start-up, from meta.json alone.
    p = copy_prefix(prefix, tmp_path / "range")
    _set_meta(p, token_ids={"min": 3, "max": VOCAB + 5})
    assert _damage_error(p, tmp_path) == (
        f"{p}.meta.json: the token ids written to {p}.bin run from 3 to {VOCAB + 5}, outside the tokenizer's "
        f"{VOCAB}-token vocabulary it records: the tokenizer or the metadata is wrong; re-run "
        f"tools/preprocess_data.py for {p}")


def test_large_data_from_before_the_record_is_checked_as_it_is_read(data, tmp_path, monkeypatch):
    import megatron_vl.data.dataset as dataset
    from megatron_vl.data.indexed import IndexedDataset
    prefix, _ = data
    p = copy_prefix(prefix, tmp_path / "old")
    _set_meta(p, token_ids=None)
    monkeypatch.setattr(dataset, "VERIFY_FINGERPRINT_BYTES", 0)   # as for a corpus-sized .bin

    def whole_file_read(self, *args, **kwargs):
        raise AssertionError(f"{self.prefix}.bin read whole at start-up")
    monkeypatch.setattr(IndexedDataset, "scan", whole_file_read)
    ds = _open(p, tmp_path)
    assert ds.notes == [f"{p}.meta.json predates the token-id record: token ids are checked against the "
                        f"{VOCAB}-token vocabulary as samples are read, not at start-up (re-run "
                        f"tools/preprocess_data.py for {p} to check them up front)"]
    d = int(ds.doc_order[ds.starts[int(ds.shuffle[0])][0]])   # the first document sample 0 reads
    tokens = np.memmap(p + ".bin", np.uint16, mode="r+")
    tokens[int(ds.text.pointers[ds.text.document_indices[d]]) // 2 + 1] = VOCAB + 7
    tokens.flush()
    del tokens
    ds = _open(p, tmp_path)   # opens as before (nothing scanned); the sample that reads it fails
    with pytest.raises(IndexedDataError) as info:
        ds[0]
    assert str(info.value) == (
        f"{p}.bin: token id {VOCAB + 7} (in document {d}) is outside the tokenizer's {VOCAB}-token vocabulary "
        f"({p}.meta.json): the file is damaged or was written with another tokenizer; re-run "
        f"tools/preprocess_data.py for {p}")


def test_content_verdict_is_keyed_by_the_real_path(data, tmp_path, monkeypatch):
    from megatron_vl.data.indexed import IndexedDataset
    prefix, _ = data
    p = copy_prefix(prefix, tmp_path / "real" / "data")
    os.symlink(tmp_path / "real", tmp_path / "link")
    scans = []
    scan = IndexedDataset.scan
    monkeypatch.setattr(IndexedDataset, "scan", lambda self, *a, **k: scans.append(self.prefix) or scan(self, *a, **k))
    _open(p, tmp_path)
    assert scans   # hashed once
    scans.clear()
    monkeypatch.chdir(tmp_path)
    for same in (os.path.join("real", "data", "d"), str(tmp_path / "link" / "data" / "d")):
        _open(same, tmp_path)
    assert scans == []


# --- a check that fails on rank 0 fails every rank, at once (no peer left in a barrier) ----------

def _open_on_every_rank(rank, world, prefixes, cache):
    import time
    seen = []
    for prefix in prefixes:
        start = time.monotonic()
        try:
            seen.append(("ok", len(PackedDataset(prefix, CFG, num_samples=8, cache_dir=cache))))
        except UserError as exc:
            seen.append((type(exc).__name__, str(exc)))
        assert time.monotonic() - start < 20, f"rank {rank} waited on {prefix}"
    return seen


def test_an_error_on_rank_0_is_raised_on_every_rank(data, tmp_path):
    from megatron_vl.testing.distributed import run_distributed
    prefix, _ = data
    ids = copy_prefix(prefix, tmp_path / "ids")
    tokens = np.memmap(ids + ".bin", np.uint16, mode="r+")
    tokens[5] = VOCAB + 1
    tokens.flush()
    del tokens
    spans = copy_prefix(prefix, tmp_path / "spans")
    with open(spans + "_images.bin", "r+b") as fh:
        fh.seek(8)
        fh.write(np.random.default_rng(3).bytes(56))
    seen = run_distributed(_open_on_every_rank, 2, [ids, spans, prefix], str(tmp_path / "cache"), timeout=90)
    assert seen[0] == seen[1]
    (kind_ids, message_ids), (kind_spans, message_spans), clean = seen[0]
    assert kind_ids == "IndexedDataError" and message_ids.startswith(f"{ids}.bin: token id {VOCAB + 1} (the largest")
    assert kind_spans == "IndexedDataError" and f"{spans}_images.bin: document 0" in message_spans
    assert clean == ("ok", 8)


def test_an_unwritable_order_cache_is_one_line_naming_the_flag(data, tmp_path, monkeypatch):
    import errno
    import megatron_vl.data.dataset as dataset
    from megatron_vl.errors import OutputError
    prefix, _ = data

    def read_only(path, arr):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(dataset, "_save_npy", read_only)
    with pytest.raises(OutputError) as info:
        PackedDataset(prefix, CFG, num_samples=5, cache_dir=str(tmp_path / "ro"))
    assert str(info.value) == (f"{tmp_path}/ro: cannot write the sample-order cache of {prefix} (Read-only file "
                               "system); pass --data-cache-path a writable directory")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--clip-grad", "nan"], "--clip-grad nan: must be a finite number"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--min-lr", "1", "--lr", "1e-3"], "--min-lr (1.0) is above --lr (0.001): the decay would raise the learning rate"),
])
def test_non_finite_numbers_negative_seeds_and_min_lr_above_lr_are_refused(flags, message):
    # Every float field, declared range or not: infinity and NaN mean nothing as a setting.
    cfg, _ = load_config(["--data-path", "x", *flags])
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    assert f"  - {message}" in str(info.value).splitlines()

"""Feature extraction across a cluster (issue 24, part 2): ranks share the shards, rank 0 merges;
the store is byte-identical whatever the rank and worker counts; a run killed hard mid-way is
finished by a rerun with another rank count; the storage arithmetic of the planner."""

import io
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from megatron_vl.data.extraction import autocast_dtype, default_workers, shard_ranges
from megatron_vl.data.features import _is_shard_file
from megatron_vl.errors import UsageError
from megatron_vl.plan.storage import CorpusStorage, storage_table
from megatron_vl.testing.scripts import run_main, run_tool

TOKENIZER = {"type": "test", "model": "-", "vocab_size": 300, "eod_id": 2,
             "image_token_ids": {"[IMG]": 298, "[/IMG]": 299}}
IMAGES_PER_DOC = [3, 1, 4, 2, 5, 3, 2, 1, 3, 2]   # 26 images: shards of 4 -> 7 (the last holds 2)
BAD_ROW = 5                                       # in shard 1: rank 1 decodes it in a 2-rank run


def _jpeg(seed, size=40):
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + seed % 7, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _write_dataset(prefix):
    from megatron_vl.data.formats import Report
    from megatron_vl.data.preprocess import DatasetWriter
    writer = DatasetWriter(prefix, TOKENIZER, multimodal=True)
    row = 0
    for d, n in enumerate(IMAGES_PER_DOC):
        images = []
        for _ in range(n):
            data = _jpeg(row)
            images.append((0, 4, data[:len(data) // 3] if row == BAD_ROW else data))
            row += 1
        writer.add(np.arange(3, 3 + 6 + d), images)
    writer.finalize(Report(), {})


def _store(prefix):
    return tuple(open(f"{prefix}_image_features{ext}", "rb").read() for ext in (".bin", ".idx"))


class _Config:
    num_tokens, embed_dim = 3, 8


class _Tokenizer(torch.nn.Module):
    """A stand-in image tokenizer in plain torch, so that the spawned ranks do not spend their
    seconds importing transformers' CLIP: [b, 3, 16, 16] -> [b, 3, 8]."""

    cfg = _Config()

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16 * 16, 3 * 8)

    def forward(self, pixels):
        return self.proj(pixels.flatten(1)).view(-1, 3, 8)


def _processor(images, return_tensors):
    """The CLIP processor's interface: images -> {"pixel_values": [b, 3, 16, 16]}."""
    arrays = [np.asarray(im.resize((16, 16)), np.float32) / 255 for im in images]
    return {"pixel_values": torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()}


def _extract(prefix, workers, **kw):
    from megatron_vl.data.features import extract_features
    return extract_features(prefix, _Tokenizer(), _processor, batch_size=3, shard_size=4, workers=workers, **kw)


def _killed_run(prefix):
    # Forked from the test (no interpreter start-up), decoding in 2 workers: SIGKILLs itself.
    _extract(prefix, 2, stop_after_shards=2)
    os._exit(0)


def _two_ranks(rank, world, fresh, killed):
    """Both 2-rank checks in one spawn: a fresh prefix with a progress bar, and the prefix a
    1-process run left when it was killed. (The ranks are daemon processes, which may not start
    DataLoader workers: asked for 2, they decode in their own process.)"""
    import contextlib
    from tqdm import tqdm
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        first = _extract(fresh, 2, progress=tqdm)
    return first, _extract(killed, 2), bar.getvalue()


@pytest.mark.slow
def test_two_ranks_and_a_killed_run_give_the_one_process_store(tmp_path):
    from megatron_vl.testing.distributed import run_distributed
    one, fresh, killed = (str(tmp_path / f"{name}_text_document") for name in ("one", "fresh", "killed"))
    for prefix in (one, fresh, killed):
        _write_dataset(prefix)
    result = _extract(one, 0)
    assert (result.count, result.shape, result.computed_shards, result.reused_shards) == (26, (3, 8), 7, 0)
    reference = _store(one)
    child = mp.get_context("fork").Process(target=_killed_run, args=(killed,))
    child.start()
    child.join(120)
    assert child.exitcode == -9
    left = sorted(os.listdir(tmp_path))
    assert [n for n in left if n.startswith("killed") and n.endswith(".idx") and "rows" in n] == [
        "killed_text_document_image_features.rows000000000000-000000000004.idx",
        "killed_text_document_image_features.rows000000000004-000000000008.idx"]
    temps = [n for n in left if ".rows000000000008-000000000012.bin.tmp" in n]
    assert len(temps) == 1 and f".tmp{child.pid}-" in temps[0]   # the dead writer's shard 2
    assert "killed_text_document.lock" in left                    # and its lock

    ranks = run_distributed(_two_ranks, 2, fresh, killed, timeout=240)
    assert ranks[0][:2] == ranks[1][:2]                          # every rank returns rank 0's result
    made, resumed, bar = ranks[0]
    assert _store(fresh) == reference and _store(killed) == reference
    assert (made.computed_shards, made.reused_shards, resumed.computed_shards, resumed.reused_shards) == (7, 0, 5, 2)
    assert 0 < made.forward_share <= 1 and 0 < resumed.forward_share <= 1   # the least busy rank's share
    assert "26/26" in bar and ranks[1][2] == ""                  # rank 0's bar counted rank 1's images too
    # Row 5 (shard 1): rank 1 decoded it in the fresh run, rank 0 reports it with its document and
    # reason; in the resumed run it sits in a shard the killed run had finished.
    assert [line.split(": ")[0] for line in made.undecodable] == [
        f"{fresh}_image_table.bin row {BAD_ROW} (document 2)"]
    assert made.undecodable == [line.replace(one, fresh) for line in result.undecodable]
    assert resumed.undecodable == [f"{killed}_image_table.bin row {BAD_ROW} (document 2): undecodable in an "
                                   "earlier run"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{name}_text_document{suffix}" for name in ("one", "fresh", "killed") for suffix in (
            ".bin", ".idx", ".meta.json", "_images.bin", "_images.idx", "_image_table.bin", "_image_table.idx",
            "_image_features.bin", "_image_features.idx"))      # no shard, temporary file or lock left


def test_shards_workers_and_dtype_rules():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and shard_ranges(0, 4) == []
    assert default_workers("cpu") == 1
    assert autocast_dtype(None, "cpu") == (None, "") and autocast_dtype("fp32", "cpu") == (None, "")
    assert autocast_dtype("bf16", "cpu") == (None, "note: --dtype bf16 applies on CUDA; on cpu the features are "
                                                   "computed in fp32")
    assert autocast_dtype(None, "cuda:3") == (torch.bfloat16, "")
    assert autocast_dtype("fp16", "cuda") == (torch.float16, "")
    assert autocast_dtype("fp32", "cuda") == (None, "")
    with pytest.raises(UsageError, match="--dtype fp8: expected one of bf16, fp16, fp32"):
        autocast_dtype("fp8", "cuda")
    store = "/d/p_text_document_image_features"
    assert _is_shard_file(store, "p_text_document_image_features.rows000000000004-000000000008.idx")
    assert _is_shard_file(store, "p_text_document_image_features.shard00003.bin")   # an earlier version's name
    for other in ("p_text_document_image_features.bin", "p_text_document_image_features.rows4-8.bin.tmp12-host",
                  "q_text_document_image_features.shard00003.bin"):
        assert not _is_shard_file(store, other)


def test_storage_arithmetic_of_the_paper_run_and_mmc4():
    core = CorpusStorage(images=29_900_000, documents=7_300_000, iterations=20_000, global_batch=4096)
    assert core.per_image == 32 * 4096 * 2 == 262_144
    assert core.paper_rule_images == 29_900_000 and core.run_images == 409_600_000
    full = CorpusStorage(images=571_000_000, documents=101_200_000)
    assert full.paper_rule_images == 506_000_000 and full.run_images == 0
    lines = storage_table(core).splitlines()
    assert lines[0] == "feature store: float16 [32, 4096] per image = 262,144 bytes (N x d x 2)"
    assert lines[2].split()[-3:] == ["29,900,000", "7.84", "7.13"]
    assert lines[4].split()[-3:] == ["409,600,000", "107.37", "97.66"]
    assert storage_table(full).splitlines()[-1].split()[-3:] == ["506,000,000", "132.64", "120.64"]
    model = ["--hidden-size", "64", "--num-layers", "2", "--num-attention-heads", "4", "--ffn-hidden-size", "176",
             "--vocab-size", "258", "--seq-length", "256", "--global-batch-size", "8", "--gpus", "8", "--top", "1"]
    code, out = run_main("tools/plan_parallelism.py", model + ["--num-image-tokens", "4", "--visual-embed-dim", "16",
                                                               "--train-iters", "10", "--corpus-images", "1000",
                                                               "--corpus-documents", "150"])
    assert code == 0, out
    assert "feature store: float16 [4, 16] per image = 128 bytes (N x d x 2)" in out
    assert "corpus, <= 5 per document (paper's rule), at most" in out and " 750 " in out
    assert "a run of 10 iterations x 8 samples x <= 5 images reads, at most" in out
    code, out = run_main("tools/plan_parallelism.py", model + ["--corpus-documents", "150"])
    assert code == 2 and "error: --corpus-documents 150 needs --corpus-images" in out
    code, out = run_main("tools/plan_parallelism.py", model + ["--corpus-images", "0"])
    assert code == 2 and "error: --corpus-images 0: must be at least 1" in out


def test_tool_store_is_the_same_for_any_worker_count_and_cpu_says_fp32_once(tmp_path):
    from megatron_vl.testing.tiny_models import save_tiny_clip
    clip = save_tiny_clip(str(tmp_path / "clip"))
    a, b, c = (str(tmp_path / f"{name}_text_document") for name in "abc")
    for prefix in (a, b, c):
        _write_dataset(prefix)
    tool = ["tools/extract_image_features.py", "--init-from-clip", clip, "--num-image-tokens", "2", "--embed-dim", "4",
            "--tokenizer-heads", "1", "--batch-size", "3", "--shard-size", "4"]
    run_tool(*tool, "--data-prefix", a, "--workers", "0", "--no-progress")
    out = run_tool(*tool, "--data-prefix", b, c, "--workers", "2", "--dtype", "bf16")
    assert _store(a) == _store(b) == _store(c)
    assert out.count("note: --dtype bf16 applies on CUDA; on cpu the features are computed in fp32") == 1
    assert out.count("forward busy ") == 2 and " s the least busy rank computed\n" in out   # no hint: a short run
    assert f"{c}_image_features: 26 images x [2, 4] float16 (7 shards computed by 1 rank(s), 0 reused" in out
    assert "features c_text_document: 100%" in out and "26/26" in out and "img/s" in out   # the bar, on stderr
    assert "error: --workers -1: must be 0" in run_tool(*tool, "--data-prefix", a, "--workers", "-1", expect=2)

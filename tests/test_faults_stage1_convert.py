"""Faults of the reliability sweep in stage 1, feature extraction, reconstruction and the
checkpoint converters: each ends in one line naming the file or flag (run through run_cli, as
the tools run), never a traceback, a silent success or an overwritten file."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import tarfile
from types import SimpleNamespace

import pytest
import torch

from data_helpers import ROOT
from megatron_vl.errors import InputError, run_cli

EMBED, TOKENS = 32, 8
DEAD_PID = 999_999_999   # above any pid_max: never a live process


def tool(script, *args, expect=0):
    """tools/X.py's main(argv) through run_cli, as `python tools/X.py` runs it; returns its output."""
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location("_fault_" + os.path.basename(script)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        spec.loader.exec_module(module)
        try:
            code = run_cli(module.main, [str(a) for a in args])
        except SystemExit as exc:   # argparse
            code = exc.code
    text = out.getvalue()
    assert code == expect, f"{script} {args} exited {code}, expected {expect}:\n{text}"
    assert "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """Tiny CLIP / SD / IP-Adapter directories, one stage-1 export (untrained), two pair shards."""
    from megatron_vl.model.detokenizer_targets import condition_shapes
    from megatron_vl.model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig
    from megatron_vl.model.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, load_image_processor
    from megatron_vl.testing.tiny_models import save_tiny_clip, save_tiny_ip_adapter, save_tiny_sd
    from test_pair_stream import _shard
    d = tmp_path_factory.mktemp("faults_s1")
    clip = save_tiny_clip(str(d / "clip"))
    save_tiny_sd(str(d / "sd"))
    weight = "ip-adapter-plus_sd15.safetensors"
    save_tiny_ip_adapter(str(d / "ip"), str(d / "sd"), weight)
    export = d / "export"
    ImageTokenizer.from_clip(clip, ImageTokenizerConfig(TOKENS, EMBED, 1, 2)).save_pretrained(
        str(export / "image_tokenizer"), load_image_processor(clip))
    shapes = condition_shapes(str(d / "ip" / "image_encoder"), str(d / "sd"))
    ImageDetokenizer(ImageDetokenizerConfig(EMBED, *shapes, width=32, num_layers=1, num_heads=2, sd_dir=str(d / "sd"),
                                            ip_adapter_dir=str(d / "ip"), ip_adapter_weight=weight)
                     ).save_pretrained(str(export / "image_detokenizer"))
    (d / "shards").mkdir()
    for s in range(2):
        _shard(d / "shards" / f"{s:05d}.tar", f"s{s}", 4, 4 * s)
    return SimpleNamespace(root=d, clip=clip, sd=str(d / "sd"), ip=str(d / "ip"), weight=weight, export=export,
                           tok=export / "image_tokenizer", detok=export / "image_detokenizer",
                           shards=str(d / "shards" / "{00000..00001}.tar"))


def copy_part(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- model directories: one loader, one line naming the file ---------------------------------

def test_damaged_part_directories_are_named(m, tmp_path):
    """E07 / E07b and their class: garbage weights, a truncated config, a 0-wide config, the other
    part's directory and a damaged CLIP tower, through extract_image_features --image-tokenizer."""
    cases = []
    garbage = copy_part(m.tok, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(3000))
    cases.append((garbage, f"{garbage}/model.safetensors: cannot read the weights"))
    cut = copy_part(m.tok, tmp_path / "cut")
    (cut / "image_tokenizer_config.json").write_text('{"num_tokens": ')
    cases.append((cut, f"{cut}/image_tokenizer_config.json: not valid JSON"))
    zero = copy_part(m.tok, tmp_path / "zero")
    cfg = json.loads((zero / "image_tokenizer_config.json").read_text())
    (zero / "image_tokenizer_config.json").write_text(json.dumps({**cfg, "embed_dim": 0}))
    cases.append((zero, f"{zero}/image_tokenizer_config.json: embed_dim is 0; it must be a positive integer"))
    cases.append((m.detok, f"{m.detok}: not an image tokenizer directory (it is an image detokenizer directory)"))
    clip = copy_part(m.tok, tmp_path / "clipdamaged")
    (clip / "clip" / "config.json").write_text("{")
    cases.append((clip, f"{clip}/clip: cannot load the CLIP vision tower"))
    weights = copy_part(m.tok, tmp_path / "clipweights")
    (weights / "clip" / "model.safetensors").write_bytes(os.urandom(500))
    cases.append((weights, f"{weights}/clip: cannot load the CLIP vision tower"))
    for path, message in cases:
        out = tool("tools/extract_image_features.py", "--no-progress", "--image-tokenizer", path,
                   "--data-prefix", tmp_path / "none", expect=1)
        assert f"error: {message}" in out, out
        assert len([line for line in out.splitlines() if "error" in line]) == 1, out


def test_extraction_refuses_zero_sizes_and_removes_dead_writers_temps(m, tmp_path, capsys):
    """E08: --batch-size / --shard-size 0 exit 2 naming the flag. K03: a killed extraction's shard
    temp files are removed by the next run (a live writer's are kept), which says so."""
    for flag in ("--batch-size", "--shard-size"):
        out = tool("tools/extract_image_features.py", "--image-tokenizer", m.tok, "--data-prefix", tmp_path / "p",
                   flag, 0, expect=2)
        assert f"{flag} 0: must be a positive number" in out
    from megatron_vl.data.features import extract_features
    from megatron_vl.errors import UsageError
    with pytest.raises(UsageError, match="--shard-size -1"):
        extract_features(str(tmp_path / "p"), None, None, 4, -1)
    host = socket.gethostname()
    dead = tmp_path / f"p_image_features.shard00003.bin.tmp{DEAD_PID}-{host}"
    live = tmp_path / f"p_image_features.shard00001.bin.tmp{os.getppid()}-{host}"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    with pytest.raises(InputError, match=f"^{tmp_path}/p.meta.json: dataset metadata missing"):
        extract_features(str(tmp_path / "p"), None, None, 4, 4)   # no dataset there: refused after the clean-up
    assert not dead.exists() and live.exists()
    assert f"note: removed {dead}, a temporary file left by pid {DEAD_PID}" in capsys.readouterr().out


# --- export-hf / import-hf / check_parity --------------------------------------------------------

def fake_checkpoint(root, stage1: bool):
    tag = root / "iter_0000002"
    tag.mkdir(parents=True)
    (root / "latest").write_text("iter_0000002")
    if stage1:
        (tag / "config.yaml").write_text("model:\n  clip_model: /models/clip\n")
        (tag / "image_tokenizer").mkdir()
        (tag / "image_detokenizer").mkdir()
    else:
        (tag / "config.yaml").write_text("model:\n  hidden_size: 64\n")
    return root


def test_export_hf_refuses_a_stage1_checkpoint_and_a_detokenizer_as_image_tokenizer(m, tmp_path):
    """X25: a stage-1 checkpoint is named as one, with the tool that exports it. X27: the
    --image-tokenizer / --image-detokenizer directories must be of those kinds; nothing written."""
    s1 = fake_checkpoint(tmp_path / "s1", stage1=True)
    out = tool("tools/convert_checkpoint.py", "export-hf", "--load", s1, "--save", tmp_path / "o1", expect=1)
    assert "a stage-1 (image tokenizer) checkpoint of train_tokenizer.py" in out
    assert "tools/export_tokenizer.py" in out and "clip_model" not in out
    s2 = fake_checkpoint(tmp_path / "s2", stage1=False)
    out = tool("tools/convert_checkpoint.py", "export-hf", "--load", s2, "--save", tmp_path / "o2",
               "--image-tokenizer", m.detok, expect=1)
    assert f"--image-tokenizer {m.detok}: not an image tokenizer directory (it is an image detokenizer" in out
    out = tool("tools/convert_checkpoint.py", "export-hf", "--load", s2, "--save", tmp_path / "o2",
               "--image-detokenizer", m.tok, expect=1)
    assert f"--image-detokenizer {m.tok}: not an image detokenizer directory (it is an image tokenizer" in out
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # check_parity on a training checkpoint (CP2): one line, no traceback.
    hf_dir = tmp_path / "hf"
    from helpers import tiny_hf_model
    tiny_hf_model().save_pretrained(hf_dir)
    out = tool("tools/check_parity.py", "--hf-dir", hf_dir, "--load", s2, expect=1)
    assert f"error: {s2}: a training checkpoint (iter_0000002), not a converted release checkpoint" in out
    # X47: a TP size the model does not divide is refused before anything is read or written.
    out = tool("tools/convert_checkpoint.py", "import-hf", "--hf-dir", hf_dir, "--save", tmp_path / "tp3",
               "--tensor-model-parallel-size", 3, expect=1)
    assert (f"--hf-dir {hf_dir} cannot be split over --tensor-model-parallel-size 3: attention heads 4, "
            f"key/value heads 2, FFN width (intermediate_size) 176 not divisible by 3") in out
    assert not (tmp_path / "tp3").exists()


def test_killed_replacement_leftovers_are_restored_or_removed(tmp_path, capsys):
    """XK: the temp dir carries pid and host; the next export into that parent removes a dead
    writer's half-written output and puts back a previous output it had moved aside."""
    from megatron_vl.atomic import temp_name
    from megatron_vl.checkpoint import output_dir
    host = socket.gethostname()
    final = tmp_path / "export"
    half = tmp_path / f"export.tmp{DEAD_PID}-{host}"
    moved = tmp_path / f"export.old.tmp{DEAD_PID}-{host}"
    half.mkdir()
    (half / "partial").write_text("half")
    moved.mkdir()
    (moved / "stage1_export.json").write_text(json.dumps({"format": "megatron-vl-stage1"}))
    live = tmp_path / f"export.tmp{os.getppid()}-{host}"
    live.mkdir()
    with output_dir.atomic_directory(str(final), "stage1-export") as tmp:
        assert tmp == temp_name(str(final))
        assert (final / "stage1_export.json").exists() and not moved.exists()   # restored first
        assert not half.exists() and live.exists()
        with open(os.path.join(tmp, "stage1_export.json"), "w") as fh:
            json.dump({"format": "megatron-vl-stage1", "new": True}, fh)
    assert json.loads((final / "stage1_export.json").read_text())["new"]
    out = capsys.readouterr().out
    assert f"note: restored {final} from {moved.name}" in out and f"note: removed {half}" in out
    assert sorted(os.listdir(tmp_path)) == sorted(["export", live.name])


# --- train_tokenizer ------------------------------------------------------------------------------

def stage1_args(m, *extra):
    return ["--clip-model", m.clip, "--sd-model", m.sd, "--ip-adapter", m.ip, "--ip-adapter-weight", m.weight,
            "--train-shards", m.shards, "--visual-embed-dim", str(EMBED), "--num-image-tokens", str(TOKENS),
            "--tokenizer-heads", "2", "--detokenizer-width", "32", "--detokenizer-heads", "2",
            "--detokenizer-layers", "1", "--micro-batch-size", "2", "--train-iters", "1", *map(str, extra)]


def test_stage1_config_ranges_and_adapter_weight_are_checked_at_start(m, capsys):
    """T108: widths, depths and N below 1 are refused as a class; T107: an adapter weight file not in
    --ip-adapter is refused naming the files there (both exit 2, before any model is built)."""
    from megatron_vl.config import ConfigError, load_config
    from megatron_vl.stage1.config import TokenizerTrainConfig
    from megatron_vl.stage1.trainer import parser, run

    def errors(*extra):
        cfg, _ = load_config(stage1_args(m, *extra), parser=parser(), config_cls=TokenizerTrainConfig)
        with pytest.raises(ConfigError) as exc:
            cfg.validate(1)
        return str(exc.value)
    msg = errors("--visual-embed-dim", 0, "--tokenizer-layers", 0, "--num-image-tokens", -1, "--shuffle-buffer", 0)
    for part in ("--visual-embed-dim 0: must be at least 1", "--tokenizer-layers 0", "--num-image-tokens -1",
                 "--shuffle-buffer 0"):
        assert part in msg, msg
    assert "--detokenizer-heads 3 does not divide --detokenizer-width 32" in errors("--detokenizer-heads", 3)
    msg = errors("--ip-adapter-weight", "wrong.bin")
    assert f"--ip-adapter-weight wrong.bin: no such file in --ip-adapter {m.ip} (weight files there: {m.weight})" in msg
    assert run(stage1_args(m, "--visual-embed-dim", 0)) == 2
    err = capsys.readouterr().err
    assert "--visual-embed-dim 0: must be at least 1" in err and "Traceback" not in err


def test_missing_and_unreadable_shards_are_one_line(m, tmp_path):
    """T102 / T105: the data path raises InputErrors (one line from run_cli), not ValueErrors in a
    traceback from the data thread."""
    from megatron_vl.data.formats import Report
    from megatron_vl.data.pair_stream import PairStream
    from megatron_vl.stage1.data import PairBatches
    missing = PairStream([[str(tmp_path / "nope.tar")]], [1.0], report=Report())
    with pytest.raises(InputError, match=f"--train-shards: 1 shard\\(s\\) do not exist: {tmp_path}/nope.tar"):
        PairBatches(missing, 2, None, encoders=object())
    (tmp_path / "junk.tar").write_bytes(os.urandom(2000))
    junk = PairStream([[str(tmp_path / "junk.tar")]], [1.0], report=Report())
    with pytest.raises(InputError, match="--train-shards: no readable pair .*junk.tar.*damaged file"):
        next(PairBatches(junk, 2, None, encoders=object())(0))


def rewrite_captions(shard):
    """Same byte size, other captions (what PT2 did)."""
    with tarfile.open(shard) as tf:
        members = [(info, tf.extractfile(info).read()) for info in tf.getmembers()]
    size = os.path.getsize(shard)
    with tarfile.open(shard, "w") as tf:
        for info, data in members:
            if info.name.endswith(".txt"):
                data = data.upper()
            tf.addfile(info, io.BytesIO(data))
    assert os.path.getsize(shard) == size


def test_precomputed_targets_follow_the_shards_contents(m, tmp_path, monkeypatch):
    """PT2: a shard rewritten at the same size (new mtime, other bytes) is recomputed by
    precompute (with a note) and refused by training's store, naming the store and the shard.
    Training trusts the recorded size and mtime (the shard is not read: its hash is never taken)
    and hashes only when the mtime changed: same bytes are used silently."""
    from megatron_vl.stage1 import targets
    from megatron_vl.stage1.targets import TargetStore, store_is_current, targets_file
    shards = tmp_path / "shards"
    shutil.copytree(m.root / "shards", shards)
    pattern = str(shards / "{00000..00001}.tar")
    common = ["--train-shards", pattern, "--sd-model", m.sd, "--ip-adapter", m.ip, "--targets-dir",
              tmp_path / "t", "--no-progress"]
    assert "wrote targets of 8 pairs from 2 shard(s)" in tool("tools/precompute_tokenizer_targets.py", *common)
    shard, other = str(shards / "00000.tar"), str(shards / "00001.tar")
    hashed = []
    real_digest = targets.shard_digest

    def no_hash(path):
        raise AssertionError(f"training read {path} to hash it")
    monkeypatch.setattr(targets, "shard_digest", no_hash)
    targets._hashes.clear()
    notes = []
    TargetStore(str(tmp_path / "t"), (17, 48), (77, 24), {}, log=notes.append)([f"{shard}:s00000", f"{other}:s10004"])
    assert notes == []
    # Same bytes, new mtime (a copy without -p, a touch): hashed once, used without a note.
    st = os.stat(other)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    monkeypatch.setattr(targets, "shard_digest", lambda path: hashed.append(path) or real_digest(path))
    TargetStore(str(tmp_path / "t"), (17, 48), (77, 24), {}, log=notes.append)([f"{other}:s10005"])
    assert hashed == [other] and notes == []
    # Same size, other bytes, new mtime: refused.
    before = os.stat(shard).st_mtime_ns
    rewrite_captions(shard)
    os.utime(shard, ns=(before, before + 5_000_000_000))   # a new mtime even on a coarse-clock filesystem
    assert not store_is_current(str(tmp_path / "t"), shard)
    with pytest.raises(InputError, match=f"^{targets_file(str(tmp_path / 't'), shard)}: made from other contents of "
                       f"{shard} \\(same size, other bytes\\): the shard changed; run tools/precompute"):
        TargetStore(str(tmp_path / "t"), (17, 48), (77, 24), {})([f"{shard}:s00000"])
    out = tool("tools/precompute_tokenizer_targets.py", *common)
    assert "2 shard(s), 1 already done" in out and "wrote targets of 4 pairs from 1 shard(s)" in out
    assert f"note: {targets_file(str(tmp_path / 't'), shard)} does not match {shard} as it is now (made from " \
           "other contents" in out
    # ...and precompute recorded the other shard's new mtime, so training trusts it again unhashed.
    assert f"note: {targets_file(str(tmp_path / 't'), other)}: the shard has a new modification time and the " \
           "same bytes; recorded the shard's hash in it (no recompute)" in out
    monkeypatch.setattr(targets, "shard_digest", no_hash)
    TargetStore(str(tmp_path / "t"), (17, 48), (77, 24), {})([f"{shard}:s00000", f"{other}:s10004"])
    assert "--batch-size 0: must be a positive" in tool("tools/precompute_tokenizer_targets.py", *common,
                                                         "--batch-size", 0, expect=2)


def write_v1_store(targets_dir, shard, keys, sources):
    """A store as the code before content hashes (store format 1) wrote it: size only."""
    from safetensors.torch import save_file
    from megatron_vl.stage1.targets import targets_file
    tensors = {"image": torch.randn(len(keys), 17, 48).half(), "text": torch.randn(len(keys), 77, 24).half()}
    meta = {"version": "1", "shard": os.path.abspath(shard), "shard_bytes": str(os.path.getsize(shard)),
            "keys": json.dumps(keys), **sources}
    os.makedirs(targets_dir, exist_ok=True)
    save_file(tensors, targets_file(targets_dir, shard), metadata=meta)
    return tensors


def test_format1_stores_are_kept_when_their_shard_is_not_newer(m, tmp_path):
    """A store of format 1 (before hashes) whose shard has its size and is not newer than it is
    used by training (one note, nothing written) and upgraded by precompute (hash, size and mtime
    recorded, tensors kept: no recompute); one whose shard is newer is refused / recomputed."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from megatron_vl.stage1.framework import ip_image_encoder_dir
    from megatron_vl.stage1.targets import TargetStore, shard_digest, targets_file
    shards = tmp_path / "shards"
    shutil.copytree(m.root / "shards", shards)
    shard, newer = str(shards / "00000.tar"), str(shards / "00001.tar")
    t = str(tmp_path / "t")
    sources = {"image_encoder": os.path.abspath(ip_image_encoder_dir(m.ip)), "sd_model": os.path.abspath(m.sd)}
    old = os.stat(shard).st_mtime_ns - 100_000_000_000
    for s in (shard, newer):
        os.utime(s, ns=(old, old))   # written before their stores
    kept = write_v1_store(t, shard, [f"s0{i:04d}" for i in range(4)], sources)
    write_v1_store(t, newer, [f"s1{i:04d}" for i in range(4, 8)], sources)
    later = os.stat(targets_file(t, newer)).st_mtime_ns + 5_000_000_000
    os.utime(newer, ns=(later, later))   # modified after its store was written: may have changed
    store_bytes = open(targets_file(t, shard), "rb").read()
    notes = []
    store = TargetStore(t, (17, 48), (77, 24), sources, log=notes.append)
    e_v, _ = store([f"{shard}:s00001", f"{shard}:s00002"])
    assert torch.equal(e_v, kept["image"][1:3])
    assert len(notes) == 1 and notes[0].startswith(f"note: {targets_file(t, shard)} (and any other store of format "
                                                   "1") and "precompute_tokenizer_targets.py once" in notes[0]
    with pytest.raises(InputError, match=f"^{targets_file(t, newer)}: store format 1 \\(no hash of the shard's bytes\\) "
                       f"and {newer} was modified after it was written: the shard may have changed; run tools/"):
        store([f"{newer}:s10004"])
    assert open(targets_file(t, shard), "rb").read() == store_bytes and sorted(os.listdir(t)) == sorted(
        os.path.basename(targets_file(t, s)) for s in (shard, newer))   # training wrote nothing
    dead = f"{targets_file(t, shard)}.tmp{DEAD_PID}-{socket.gethostname()}"
    open(dead, "wb").write(b"half an upgrade")
    out = tool("tools/precompute_tokenizer_targets.py", "--train-shards", str(shards / "{00000..00001}.tar"),
               "--sd-model", m.sd, "--ip-adapter", m.ip, "--targets-dir", t, "--no-progress")
    assert f"note: {targets_file(t, shard)}: store format 1 (no hash of the shard's bytes); the shard has its size " \
           "and is not newer than it; recorded the shard's hash in it (no recompute)" in out
    assert f"note: {targets_file(t, newer)} does not match {newer} as it is now (store format 1" in out
    assert "2 shard(s), 1 already done" in out and "wrote targets of 4 pairs from 1 shard(s)" in out
    assert f"note: removed {dead}, a temporary file left by pid {DEAD_PID}" in out
    with safe_open(targets_file(t, shard), "pt") as fh:
        meta = fh.metadata()
    assert meta["version"] == "2" and meta["shard_blake2b"] == shard_digest(shard)
    assert (meta["shard_bytes"], meta["shard_mtime_ns"]) == (str(os.path.getsize(shard)), str(old))
    assert meta["keys"] == json.dumps([f"s0{i:04d}" for i in range(4)]) and meta["sd_model"] == sources["sd_model"]
    upgraded = load_file(targets_file(t, shard))
    assert all(torch.equal(upgraded[k], kept[k]) for k in kept)   # the targets themselves were not recomputed
    assert sorted(os.listdir(t)) == sorted(os.path.basename(targets_file(t, s)) for s in (shard, newer))
    notes.clear()
    fresh = TargetStore(t, (17, 48), (77, 24), sources, log=notes.append)
    assert torch.equal(fresh([f"{shard}:s00003"])[0], kept["image"][3:4]) and notes == []
    fresh([f"{newer}:s10007"])   # recomputed: now current


# --- reconstruct_images / eval_reconstruction ---------------------------------------------------

def save_png(path, size=(32, 32)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_reconstruct_bad_inputs_are_one_line(m, tmp_path, monkeypatch):
    """R07 (decompression bomb), R02 (cut image), R1_shape, R1_garb, R1_nan, R01 (a PNG already
    in --output): refused naming the file, before the diffusion models load; nothing written."""
    from PIL import Image
    recon = ["tools/reconstruct_images.py", "--export", m.export, "--steps", 1, "--output", tmp_path / "out"]
    img = save_png(tmp_path / "a" / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 32x32 is then > 2x the limit: a "bomb"
    out = tool(*recon, "--images", img, expect=1)
    assert f"error: --images {img}: too large to decode safely" in out
    monkeypatch.undo()
    cut = tmp_path / "cut.jpg"
    save_png(tmp_path / "full.jpg")
    cut.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    assert f"error: --images {cut}: not a readable image" in tool(*recon, "--images", cut, expect=1)
    torch.save(torch.randn(16, 48), tmp_path / "shape.pt")
    out = tool(*recon, "--embeddings", tmp_path / "shape.pt", expect=1)
    assert f"--embeddings {tmp_path}/shape.pt: shaped [1, 16, 48], the export reads [k, N={TOKENS}, d={EMBED}]" in out
    (tmp_path / "garb.pt").write_text("garbage")
    assert f"--embeddings {tmp_path}/garb.pt: not a torch.save'd tensor" in tool(*recon, "--embeddings",
                                                                                  tmp_path / "garb.pt", expect=1)
    nan = torch.randn(3, TOKENS, EMBED)
    nan[1, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    out = tool(*recon, "--embeddings", tmp_path / "nan.pt", expect=1)
    assert f"--embeddings {tmp_path}/nan.pt: embedding(s) [1] hold NaN or infinite values" in out
    assert not (tmp_path / "out").exists()   # nothing written by the refused runs
    mine = tmp_path / "out" / "img_both.png"
    mine.parent.mkdir()
    mine.write_bytes(b"mine")
    out = tool(*recon, "--images", img, expect=1)
    assert f"--output {mine} already exists and this run did not make it" in out and "--overwrite" in out
    assert mine.read_bytes() == b"mine" and os.listdir(tmp_path / "out") == ["img_both.png"]


def test_reconstruct_same_basenames_get_distinct_pngs_and_overwrite_replaces(m, tmp_path):
    """R01b: two inputs named img.png give img_1 / img_2; R01: --overwrite replaces a PNG."""
    a, b = save_png(tmp_path / "a" / "img.png"), save_png(tmp_path / "b" / "img.png", (40, 40))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "img_1_both.png").write_bytes(b"mine")
    out = tool("tools/reconstruct_images.py", "--export", m.export, "--steps", 1, "--images", a, b, "--output",
               out_dir, "--overwrite")
    assert f"wrote {out_dir / 'img_1_both.png'}" in out and f"wrote {out_dir / 'img_2_both.png'}" in out
    assert sorted(os.listdir(out_dir)) == ["img_1_both.png", "img_2_both.png"]
    assert (out_dir / "img_1_both.png").read_bytes()[:4] == b"\x89PNG"
    spec = importlib.util.spec_from_file_location("_recon", os.path.join(ROOT, "tools/reconstruct_images.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.output_names(["x/a.png", "y/a.jpg", "a_1.png", "b.png"]) == ["a_1_", "a_2", "a_1", "b"]


def test_eval_reconstruction_problems_are_one_line(m, tmp_path):
    """ER4 (--max-images 0: exit 2), ER2 (CLIP scoring directory missing), ER1 (no readable shard)."""
    from megatron_vl.testing.tiny_models import save_tiny_ip_image_encoder
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    base = ["tools/eval_reconstruction.py", "--export", m.export, "--steps", 1, "--no-progress"]
    out = tool(*base, "--shards", junk, "--clip-score-model", tmp_path / "none", "--max-images", 0, expect=2)
    assert "--max-images 0: must be at least 1" in out
    out = tool(*base, "--shards", junk, "--clip-score-model", tmp_path / "none", expect=1)
    assert f"error: {tmp_path}/none: no such CLIP scoring model (--clip-score-model) directory" in out
    score = save_tiny_ip_image_encoder(str(tmp_path / "score"), seed=7)
    out = tool(*base, "--shards", junk, "--clip-score-model", score, expect=1)
    assert f"error: --shards {junk}: no readable pair" in out and "damaged file" in out
    # --output-json: a file this tool did not write is refused before anything loads (the user's
    # notes stay), its own earlier scores are replaced by a rerun, --overwrite replaces anything.
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    out = tool(*base, "--shards", junk, "--clip-score-model", score, "--output-json", notes, expect=1)
    assert f"error: --output-json {notes} already exists and this run did not make it" in out
    assert notes.read_text() == '{"mine": 1}'
    out = tool(*base, "--shards", junk, "--clip-score-model", score, "--output-json", notes, "--overwrite", expect=1)
    assert "no readable pair" in out   # past the guard
    notes.write_text('{"tool": "megatron-vl eval_reconstruction", "scores": {}}')
    out = tool(*base, "--shards", junk, "--clip-score-model", score, "--output-json", notes, expect=1)
    assert "no readable pair" in out


# --- tiny model writers never overwrite -------------------------------------------------------------

def test_tiny_model_writers_refuse_to_overwrite(tmp_path):
    """MS3 stays handled: an existing clip/ (or a model in make_tiny_clip's --save) is refused unless
    --overwrite; unrelated files beside it are never touched."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    out = tool("tools/make_tiny_stage1_models.py", "--save", tmp_path, expect=1)
    assert f"--save {tmp_path} already holds clip" in out
    out = tool("tools/make_tiny_clip.py", "--save", tmp_path / "clip", expect=1)
    assert "already holds config.json" in out
    assert (tmp_path / "clip" / "config.json").read_text() == "mine" and sorted(os.listdir(tmp_path)) == [
        "clip", "notes.txt"]


def test_export_tokenizer_names_an_absent_step(m, tmp_path):
    """X16: --ckpt-step of a checkpoint that is not there is named with the steps present."""
    ck = tmp_path / "ck" / "iter_0000004"
    for part in ("image_tokenizer", "image_detokenizer"):
        shutil.copytree(m.export / part, ck / part)
    (tmp_path / "ck" / "latest").write_text("iter_0000004")
    out = tool("tools/export_tokenizer.py", "--load", tmp_path / "ck", "--save", tmp_path / "o", "--ckpt-step", 7,
               expect=1)
    assert f"--load {tmp_path / 'ck'}: no checkpoint iter_0000007 (--ckpt-step 7); present: iter_0000004" in out
    assert not (tmp_path / "o").exists()
    tool("tools/export_tokenizer.py", "--load", tmp_path / "ck", "--save", tmp_path / "o")
    assert (tmp_path / "o" / "image_tokenizer").is_dir()

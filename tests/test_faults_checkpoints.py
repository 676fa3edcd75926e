"""Checkpoints a run did not write are never overwritten or rewound (--save holding
checkpoints without --load, --load A --save B with newer ones in B, another stage's
directory, two runs on one --save), mixed checkpoints are refused by name, a resumed run
with a longer --train-iters continues its schedule, a full disk during a save is one line
with `latest` intact, a stale JIT build lock is named at once, a malformed fault hook and a
stage-3 run without --load are refused. In-process (one_rank_job) except the lock holder."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from argparse import Namespace

import pytest

from megatron_vl.training import checkpoint as ckpt
from pretrain_helpers import pretrain_in_process, tiny_args


def _digest(directory):
    return {os.path.relpath(os.path.join(r, n), directory): hashlib.md5(open(os.path.join(r, n), "rb").read()).hexdigest()
            for r, _, names in os.walk(directory) for n in names}


@pytest.fixture(scope="module")
def trained(vl_data, tmp_path_factory):
    """A 4-iteration run saved at 2 and 4 (with --save-interval 2)."""
    from _pytest.monkeypatch import MonkeyPatch
    d = tmp_path_factory.mktemp("ckpts") / "run"
    mp = MonkeyPatch()

    class Quiet:
        def readouterr(self):
            return Namespace(out="", err="")
    try:
        code, _ = pretrain_in_process(tiny_args(vl_data, "--save", d, "--save-interval", 2, iters=4), mp, Quiet())
    finally:
        mp.undo()
    assert code == 0
    return d


def run(vl_data, monkeypatch, capsys, *extra, iters=4):
    return pretrain_in_process(tiny_args(vl_data, *extra, iters=iters), monkeypatch, capsys)


@pytest.mark.timeout(300)
def test_checkpoints_in_save_are_never_overwritten(vl_data, trained, tmp_path, monkeypatch, capsys):
    s = tmp_path / "s"
    shutil.copytree(trained, s)
    before = _digest(s)
    # KS2: --save holds checkpoints, no --load
    code, out = run(vl_data, monkeypatch, capsys, "--save", s, "--save-interval", 2, "--seed", 7, iters=2)
    assert code == 1, out[-2000:]
    assert (f"error: --save {s} already holds checkpoints (`latest`: iter_0000004) and no --load was given: pass "
            f"--load {s} to resume from them, or choose a new --save") in out
    assert _digest(s) == before and not os.path.exists(s / ckpt.LOCK)
    # KS3: --load A (iteration 2) --save B holding iteration 4
    a = tmp_path / "a"
    shutil.copytree(trained, a)
    (a / "latest").write_text("iter_0000002")
    code, out = run(vl_data, monkeypatch, capsys, "--load", a, "--save", s, "--save-interval", 2, iters=8)
    assert code == 1
    assert (f"error: --save {s} holds iter_0000004, newer than what --load {a} starts from (iter_0000002): this run "
            f"would overwrite it. To continue that run, pass --load {s}") in out
    assert _digest(s) == before
    # --finetune into its own directory: iteration 0 would overwrite
    code, out = run(vl_data, monkeypatch, capsys, "--load", s, "--save", s, "--finetune", iters=2)
    assert code == 1 and f"--finetune starts at iteration 0, and --save {s} holds checkpoints up to iter_0000004" in out
    assert _digest(s) == before
    # K25: another live run holds the directory
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (s / ckpt.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                               "started": "now", "command": "pretrain_vlgpt.py other"}))
        code, out = run(vl_data, monkeypatch, capsys, "--load", s, "--save", s, iters=6)
        assert code == 1 and f"{s / ckpt.LOCK}: checkpoint directory {s} is in use by another run" in out
        assert f"pid {holder.pid}" in out
    finally:
        holder.kill()
        holder.wait()
    assert _digest(s) == dict(before, **{ckpt.LOCK: _digest(s)[ckpt.LOCK]})
    # KR8: an uncommitted tag newer than `latest` (a killed save) and stale temps are removed, then resume
    # works; the dead holder's lock is taken over.
    (s / "iter_0000006").mkdir()
    (s / "iter_0000006" / "config.yaml.tmp999999").write_text("partial")
    (s / "latest.tmp999999").write_text("iter_0000006")
    code, out = run(vl_data, monkeypatch, capsys, "--load", s, "--save", s, iters=4)
    assert code == 0, out[-3000:]
    assert f"note: removed {s}/iter_0000006: newer than the checkpoint `latest` names (iter_0000004)" in out
    assert f"note: removed {s}/latest.tmp999999" in out
    # a resumed run with nothing left to do does not rewrite its checkpoint in place
    assert "saved checkpoint" not in out
    assert _digest(s) == before and not os.path.exists(s / ckpt.LOCK)


def test_save_dir_rules_for_stages_and_rewinds(tmp_path):
    def fake(d, stage, tags, latest):
        for t in tags:
            (d / ckpt.tag_name(t)).mkdir(parents=True)
            if stage:
                (d / ckpt.tag_name(t) / "stage.json").write_text(json.dumps({"stage": stage}))
        (d / "latest").write_text(ckpt.tag_name(latest))
    s2 = tmp_path / "s2"
    fake(s2, None, [100], 100)   # an older stage-2 checkpoint: no stage.json
    # FI09b: stage 3 with --save = the stage-2 directory (also with --load of it)
    for load in (None, s2):
        with pytest.raises(ckpt.CheckpointError, match=r"--save .*/s2 holds stage-2 \(pretraining, pretrain_vlgpt.py\) "
                           r"checkpoints \(`latest`: iter_0000100\); this stage-3 .* run would write over them"):
            ckpt.save_dir_problems(str(s2), load and str(s2), None, True, "instruct")
    # stage 1 into a stage-2 directory
    with pytest.raises(ckpt.CheckpointError, match="this stage-1"):
        ckpt.save_dir_problems(str(s2), str(s2), None, False, "tokenizer")
    # a release directory as --save
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "latest").write_text("release")
    with pytest.raises(ckpt.CheckpointError, match="is a release checkpoint"):
        ckpt.save_dir_problems(str(rel), str(rel), None, False, "pretrain")
    # --ckpt-step rewind in place: allowed, said
    s3 = tmp_path / "s3"
    fake(s3, "instruct", [8, 16], 16)
    said = []
    ckpt.save_dir_problems(str(s3), str(s3), 8, False, "instruct", said.append)
    assert said == [f"note: --ckpt-step 8 rewinds {s3} to iter_0000008 although `latest` names iter_0000016: this "
                    "run replaces iter_0000016 as it reaches them (to keep them, resume into a new --save)"]
    # FI01-FI05: a stage-1 checkpoint given to stage 2/3 (older: recognised by its exported tokenizer)
    s1 = tmp_path / "s1"
    fake(s1, None, [2], 2)
    (s1 / "iter_0000002" / "image_tokenizer").mkdir()
    for stage in ("instruct", "pretrain"):
        with pytest.raises(ckpt.CheckpointError, match=r"iter_0000002 is a stage-1 \(image tokenizer, "
                           r"train_tokenizer.py\) checkpoint, not a stage-2"):
            ckpt.check_load_stage(str(s1), None, stage)
    with pytest.raises(ckpt.CheckpointError, match="is a stage-3 .* not a stage-1 one"):
        ckpt.check_load_stage(str(s3), None, "tokenizer")


@pytest.mark.timeout(300)
def test_mixed_checkpoint_is_refused_by_name(vl_data, trained, tmp_path, monkeypatch, capsys):
    """FI10: files of two saves in one tag directory (a stage-3 run saved over a 2-rank stage-2
    checkpoint left the other rank's optimizer file)."""
    m = tmp_path / "mixed"
    shutil.copytree(trained, m)
    tag = m / "iter_0000004"
    optim = next(p for p in os.listdir(tag) if "optim_states" in p)
    stray = tag / optim.replace("zero_pp_rank_0", "zero_pp_rank_1")
    shutil.copy(tag / optim, stray)
    code, out = run(vl_data, monkeypatch, capsys, "--load", m, "--save", tmp_path / "out", iters=6)
    assert code == 1
    assert f"error: {stray}: not part of this checkpoint (not in its manifest): files of two different saves" in out
    # an older checkpoint (no manifest): the stray file was written under another DeepSpeed configuration
    os.remove(tag / ckpt.MANIFEST)
    import torch
    sd = torch.load(stray, weights_only=False)
    sd["ds_config"] = dict(sd["ds_config"], train_batch_size=64)
    torch.save(sd, stray)
    problem = ckpt.mixed_files_problem(str(m), "iter_0000004")
    assert problem and "written with another DeepSpeed configuration" in problem and str(stray) in problem


@pytest.mark.timeout(300)
def test_longer_train_iters_continues_the_schedule_and_disk_full_keeps_latest(vl_data, trained, tmp_path,
                                                                            monkeypatch, capsys):
    # K18: 4 iterations (cosine to 0) resumed with --train-iters 8: iteration 5 uses the new schedule's rate
    from megatron_vl.config import load_config
    from megatron_vl.training.optim import lr_at
    s = tmp_path / "k18"
    shutil.copytree(trained, s)
    code, out = run(vl_data, monkeypatch, capsys, "--load", s, "--save", s, "--save-interval", 2, iters=8)
    assert code == 0, out[-3000:]
    cfg, _ = load_config(tiny_args(vl_data, iters=8))
    expect = lr_at(4, cfg.optimizer, 8)
    assert expect > 0
    assert (f"note: learning-rate schedule rebuilt for --train-iters 8 (checkpoint: 4) at step 4: iteration 5 "
            f"uses lr {expect:.6E}") in out
    line = next(l for l in out.splitlines() if l.startswith("iteration 5/8"))
    assert f"learning rate: {expect:.6E}" in line
    # DF1: the disk fills during the second save: one line, the partial tag removed, `latest` kept
    import torch
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if "iter_0000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 832 vs 726 "
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    df = tmp_path / "df"
    code, out = run(vl_data, monkeypatch, capsys, "--save", df, "--save-interval", 2, iters=4)
    assert code == 1
    err = [l for l in out.splitlines() if l.startswith("error:")]
    assert err == [f"error: no space left on the device while saving checkpoint {df}/iter_0000004: removed the "
                   f"incomplete iter_0000004; {df}/latest still names iter_0000002: free space, then resume with "
                   f"--load {df}"]
    assert "Traceback" not in out
    assert (df / "latest").read_text() == "iter_0000002" and not (df / "iter_0000004").exists()
    assert not (df / ckpt.LOCK).exists()


def test_stale_build_lock_is_reported_at_once(tmp_path, monkeypatch):
    """H2: a lock no process works beside is named after a short watch; a live build's is not."""
    from megatron_vl.training import engine
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build)   # like ninja
    try:
        start = time.time()
        assert engine.stale_build_locks(grace_seconds=0.5) == []
        assert time.time() - start < 0.5
    finally:
        busy.kill()
        busy.wait()
    assert engine.stale_build_locks(grace_seconds=0.5) == [str(lock)]
    # A build on another node sharing the directory is invisible in /proc but keeps writing there:
    # its lock is watched, not called stale, and released when that build ends.
    import threading

    def remote_build():
        for i in range(12):
            (build / f"obj{i}.o").write_text("x")
            time.sleep(0.1)
        lock.unlink()
    builder = threading.Thread(target=remote_build)
    lock.touch()
    builder.start()
    try:
        assert engine.stale_build_locks(grace_seconds=0.5) == []
    finally:
        builder.join()
    lock.write_text("")
    monkeypatch.setattr(engine, "stale_build_locks", lambda: [str(lock)])
    with pytest.raises(engine.StaleBuildLock, match=rf"{lock}: left by a JIT extension build that was killed "
                       rf"half-way .* remove that directory \(rm -rf {build}; it is rebuilt\)"):
        engine.check_build_locks()


def test_malformed_fault_hook_and_finetune_without_load(vl_data, monkeypatch, capsys):
    from megatron_vl.config import ConfigError, load_config
    from megatron_vl.errors import UsageError
    from megatron_vl.training import faults, finetune
    for spec in ("garbage spec @@", "nan_loss@x", "nan_los@3", "nan_loss@0"):
        monkeypatch.setenv(faults.ENV, spec)
        with pytest.raises(UsageError, match=rf"MEGATRON_VL_INJECT=.*expected NAME@ITER"):
            faults.check()
    monkeypatch.setenv(faults.ENV, "garbage spec @@")
    code, out = run(vl_data, monkeypatch, capsys, iters=1)
    assert code == 2 and "error: MEGATRON_VL_INJECT='garbage spec @@': 'garbage spec @@' is not a fault" in out
    assert "Traceback" not in out
    monkeypatch.setenv(faults.ENV, "nan_loss@3,4;kill_during_save@2")
    assert faults.nan_loss_at(4) and not faults.nan_loss_at(2)
    monkeypatch.delenv(faults.ENV)
    # FI08: stage 3 without --load
    cfg, _ = load_config([])
    with pytest.raises(ConfigError, match="no --load: stage 3 tunes a stage-2 checkpoint: pass --load DIR"):
        finetune.prepare(cfg, Namespace(allow_random_init=False))
    finetune.prepare(cfg, Namespace(allow_random_init=True))
    from megatron_vl.training.pretrain import parser
    assert parser(stage="instruct").parse_args(["--allow-random-init"]).allow_random_init


def _preflight_rank(rank, world, save):
    from megatron_vl.config import load_config
    from megatron_vl.training.engine import preflight
    cfg, _ = load_config(["--save", save])
    try:
        with preflight(cfg, "pretrain", log=lambda m: None):
            return "ran"
    except Exception as exc:   # noqa: BLE001 - what each rank saw
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.timeout(120)
def test_lock_refusal_reaches_every_rank(tmp_path):
    """K25 with 2 ranks: rank 0 alone takes --save's lock; when it cannot, rank 1 stops too
    (no rank left waiting in a collective)."""
    from megatron_vl.testing.distributed import run_distributed
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ckpt.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                      "started": "now", "command": "other run"}))
        seen = run_distributed(_preflight_rank, 2, str(tmp_path), timeout=100)
    finally:
        holder.kill()
        holder.wait()
    assert all(f"checkpoint directory {tmp_path} is in use by another run (host" in s for s in seen), seen

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
import sys
import time
from argparse import Namespace

import pytest

from megatron_vl.checkpoint.layout import CheckpointError, LOCK, MANIFEST, list_tags, tag_name
from megatron_vl.testing import processes
from megatron_vl.training import checkpointing
from megatron_vl.training.checkpointing import _agree_or_raise, _disk_full, save_checkpoint
from megatron_vl.training import save_rules
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
    assert _digest(s) == before and not os.path.exists(s / LOCK)
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
    holder = processes.start_process([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (s / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                               "started": "now", "command": "pretrain_vlgpt.py other"}))
        code, out = run(vl_data, monkeypatch, capsys, "--load", s, "--save", s, iters=6)
        assert code == 1 and f"{s / LOCK}: checkpoint directory {s} is in use by another run" in out
        assert f"pid {holder.pid}" in out
    finally:
        holder.kill()
        holder.wait()
    assert _digest(s) == dict(before, **{LOCK: _digest(s)[LOCK]})
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
    assert _digest(s) == before and not os.path.exists(s / LOCK)


def test_save_dir_rules_for_stages_and_rewinds(tmp_path):
    def fake(d, stage, tags, latest):
        for t in tags:
            (d / tag_name(t)).mkdir(parents=True)
            if stage:
                (d / tag_name(t) / "stage.json").write_text(json.dumps({"stage": stage}))
        (d / "latest").write_text(tag_name(latest))
    s2 = tmp_path / "s2"
    fake(s2, None, [100], 100)   # an older stage-2 checkpoint: no stage.json
    # FI09b: stage 3 with --save = the stage-2 directory (also with --load of it)
    for load in (None, s2):
        with pytest.raises(CheckpointError, match=r"--save .*/s2 holds stage-2 \(pretraining, pretrain_vlgpt.py\) "
                           r"checkpoints \(`latest`: iter_0000100\); this stage-3 .* run would write over them"):
            save_rules.save_dir_problems(str(s2), load and str(s2), None, True, "instruct")
    # stage 1 into a stage-2 directory
    with pytest.raises(CheckpointError, match="this stage-1"):
        save_rules.save_dir_problems(str(s2), str(s2), None, False, "tokenizer")
    # a release directory as --save
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "latest").write_text("release")
    with pytest.raises(CheckpointError, match="is a release checkpoint"):
        save_rules.save_dir_problems(str(rel), str(rel), None, False, "pretrain")
    # --ckpt-step rewind in place: allowed, said
    s3 = tmp_path / "s3"
    fake(s3, "instruct", [8, 16], 16)
    said = []
    save_rules.save_dir_problems(str(s3), str(s3), 8, False, "instruct", said.append)
    assert said == [f"note: --ckpt-step 8 rewinds {s3} to iter_0000008 although `latest` names iter_0000016: this "
                    "run replaces iter_0000016 as it reaches them (to keep them, resume into a new --save)"]
    # FI01-FI05: a stage-1 checkpoint given to stage 2/3 (older: recognised by its exported tokenizer)
    s1 = tmp_path / "s1"
    fake(s1, None, [2], 2)
    (s1 / "iter_0000002" / "image_tokenizer").mkdir()
    for stage in ("instruct", "pretrain"):
        with pytest.raises(CheckpointError, match=r"iter_0000002 is a stage-1 \(image tokenizer, "
                           r"train_tokenizer.py\) checkpoint, not a stage-2"):
            save_rules.check_load_stage(str(s1), None, stage)
    with pytest.raises(CheckpointError, match="is a stage-3 .* not a stage-1 one"):
        save_rules.check_load_stage(str(s3), None, "tokenizer")


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
    # An older checkpoint (no manifest): the model states say 1 data-parallel rank, so rank 1's optimizer
    # file is another save's. Found without unpickling any optimizer file (rank 0 would read them all
    # while every other rank waits).
    os.remove(tag / MANIFEST)
    import torch
    real_load, opened = torch.load, []
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: opened.append(str(f)) or real_load(f, *a, **kw))
    problem = save_rules.mixed_files_problem(str(m), "iter_0000004")
    assert problem == (f"{stray}: the optimizer state of data-parallel rank 1, but the checkpoint's model states were "
                       "written by 1 data-parallel rank(s): files of two different saves (another run saved into "
                       "this directory?); it cannot be loaded: resume from another checkpoint with --ckpt-step, or "
                       "from the run that wrote it")
    assert opened and not [f for f in opened if "optim_states" in f], opened
    os.remove(stray)
    assert save_rules.mixed_files_problem(str(m), "iter_0000004") is None


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
    # torch.save's failure carries no errno: a full disk when the file system has no space left
    monkeypatch.setattr(checkpointing, "_free_bytes", lambda d: 4096)
    df = tmp_path / "df"
    code, out = run(vl_data, monkeypatch, capsys, "--save", df, "--save-interval", 2, iters=4)
    assert code == 1
    err = [l for l in out.splitlines() if l.startswith("error:")]
    assert err == [f"error: no space left on the device while saving checkpoint {df}/iter_0000004 (writing "
                   f"{df}/iter_0000004/mp_rank_00_model_states.pt): removed the incomplete iter_0000004; "
                   f"{df}/latest still names iter_0000002: free space, then resume with --load {df}"]
    assert "Traceback" not in out
    assert (df / "latest").read_text() == "iter_0000002" and not (df / "iter_0000004").exists()
    assert not (df / LOCK).exists()
    # Item 6: an I/O error that is not a full disk (EIO, a stale NFS handle; or torch.save's failure with
    # space left) is not called one: one line naming the file, `latest` kept.
    import errno

    def io_error(obj, f, *a, **kw):
        if "iter_0000004" in str(f):
            raise OSError(errno.EIO, "Input/output error", str(f))
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", io_error)
    eio = tmp_path / "eio"
    code, out = run(vl_data, monkeypatch, capsys, "--save", eio, "--save-interval", 2, iters=4)
    assert code == 1 and "Traceback" not in out
    err = [l for l in out.splitlines() if l.startswith("error:")]
    assert err == [f"error: could not write {eio}/iter_0000004/mp_rank_00_model_states.pt (I/O error: Input/output "
                   f"error); {eio}/latest still names iter_0000002; removed the incomplete iter_0000004"]
    assert (eio / "latest").read_text() == "iter_0000002" and not (eio / "iter_0000004").exists()
    monkeypatch.setattr(checkpointing, "_free_bytes", lambda d: 10 * 2**30)
    for exc in (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 832 vs 726"),
                RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                OSError(errno.ESTALE, "Stale file handle")):
        assert not _disk_full(exc, str(eio))
    assert _disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), str(eio))


def test_stale_build_lock_is_reported_at_once(tmp_path, monkeypatch):
    """H2: a lock no process works beside is named after a short watch; a live build's is not."""
    from megatron_vl.training import preflight
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    busy = processes.start_process([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build)   # like ninja
    try:
        start = time.time()
        assert preflight.stale_build_locks(grace_seconds=0.5) == []
        assert time.time() - start < 0.5
    finally:
        busy.kill()
        busy.wait()
    assert preflight.stale_build_locks(grace_seconds=0.5) == [str(lock)]
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
        assert preflight.stale_build_locks(grace_seconds=0.5) == []
    finally:
        builder.join()
    lock.write_text("")
    monkeypatch.setattr(preflight, "stale_build_locks", lambda log=print: [str(lock)])
    with pytest.raises(preflight.StaleBuildLock, match=rf"{lock}: left by a JIT extension build that was killed "
                       rf"half-way .* remove that directory \(rm -rf {build}; it is rebuilt\)"):
        preflight.check_build_locks()


def test_malformed_fault_hook_and_finetune_without_load(vl_data, monkeypatch, capsys):
    from megatron_vl.config import ConfigError, load_config
    from megatron_vl.errors import UsageError
    from megatron_vl.training import faults, finetune
    for spec in ("garbage spec @@", "nan_loss@x", "nan_los@3", "nan_loss@0"):
        monkeypatch.setenv(faults.ENV, spec)
        with pytest.raises(UsageError, match=r"MEGATRON_VL_INJECT=.*expected NAME@ITER"):
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
        finetune.prepare(cfg, allow_random_init=False)
    finetune.prepare(cfg, allow_random_init=True)
    from megatron_vl.training.pretrain import parser
    assert parser(stage="instruct").parse_args(["--allow-random-init"]).allow_random_init


class _FakeDeepSpeed:
    """DeepSpeed's save as far as it matters here: each rank writes its file through its checkpoint
    engine between two barriers; rank 1's write finds the disk full."""

    def __init__(self, rank):
        self.rank = rank
        self.checkpoint_engine = self

    def save(self, state_dict, path):
        import errno
        if self.rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        with open(path, "w") as fh:
            fh.write("part")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import torch.distributed as dist
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        dist.barrier()
        self.checkpoint_engine.save(client_state, os.path.join(save_dir, tag, f"rank{self.rank}_states.pt"))
        dist.barrier()


def _preflight_rank(rank, world, save, save2):
    from megatron_vl.config import load_config
    from megatron_vl.training.preflight import preflight
    cfg, _ = load_config(["--save", save])
    seen = []
    try:
        with preflight(cfg, "pretrain", log=lambda m: None):
            seen.append("ran")
    except Exception as exc:   # noqa: BLE001 - what each rank saw
        seen.append(f"{type(exc).__name__}: {exc}")
    # Item 2: a failed write on rank 1 stops both ranks (rank 0 is not left in a barrier)
    start = time.monotonic()
    try:
        save_checkpoint(_FakeDeepSpeed(rank), cfg, save2, 2, {}, None, log=lambda m: None)
        seen.append("saved")
    except Exception as exc:   # noqa: BLE001
        seen.append(f"{type(exc).__name__}: {exc}")
    seen.append(time.monotonic() - start)
    return seen


@pytest.mark.timeout(120)
def test_lock_refusal_reaches_every_rank(tmp_path):
    """K25 with 2 ranks: rank 0 alone takes --save's lock; when it cannot, rank 1 stops too
    (no rank left waiting in a collective). Item 2 in the same processes: rank 1's write fails
    (disk full): both ranks stop within seconds with one line each, `latest` unchanged."""
    from megatron_vl.testing.distributed import run_distributed
    holder = processes.start_process([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                      "started": "now", "command": "other run"}))
        save2 = tmp_path / "save2"
        save2.mkdir()
        (save2 / "latest").write_text("iter_0000001")
        seen = run_distributed(_preflight_rank, 2, str(tmp_path), str(save2), timeout=100)
    finally:
        holder.kill()
        holder.wait()
    assert all(f"checkpoint directory {tmp_path} is in use by another run (host" in s[0] for s in seen), seen
    assert seen[1][1] == (f"OutputError: no space left on the device while saving checkpoint {save2}/iter_0000002 "
                          f"(writing {save2}/iter_0000002/rank1_states.pt): removed the incomplete iter_0000002; "
                          f"{save2}/latest still names iter_0000001: free space, then resume with --load {save2}")
    assert seen[0][1] == (f"OutputError: rank 1 failed to write its part of iter_0000002 in {save2}: see its error; "
                          f"removed the incomplete iter_0000002; {save2}/latest still names iter_0000001")
    assert all(s[2] < 10 for s in seen), seen
    assert (save2 / "latest").read_text() == "iter_0000001" and not (save2 / "iter_0000002").exists()


@pytest.mark.timeout(300)
def test_unreadable_latest_removes_nothing(vl_data, trained, tmp_path, monkeypatch, capsys):
    """Item 1 (K10-K12 with --save): without a valid `latest` nothing tells committed tags from a
    killed save's: every file stays, one line names the marker, the tags and the way out."""
    d = tmp_path / "d"
    shutil.copytree(trained, d)
    marker = d / "latest"
    cases = [("garbage", "says 'garbage', not a checkpoint tag (iter_NNNNNNN)", True),
             ("", "is empty", True), ("iter_0000006", "names iter_0000006, which is not there", True),
             (None, "is missing", True), (None, "is missing", False)]
    for text, why, with_load in cases:
        if text is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(text)
        before = _digest(d)
        code, out = run(vl_data, monkeypatch, capsys, *(["--load", d] if with_load else []), "--save", d, iters=6)
        assert code == 1, out[-2000:]
        err = [l for l in out.splitlines() if l.startswith("error:")]
        assert err == [f"error: {marker} {why}, but {d} holds iter_0000002, iter_0000004: nothing there is removed "
                       f"or overwritten. Write the tag of the checkpoint to resume into it (echo iter_0000004 > "
                       f"{marker}), or resume one with --load {d} --ckpt-step N"], out[-2000:]
        assert _digest(d) == before
    # --ckpt-step names the checkpoint: resumed, the newer one replaced only when reached, nothing removed
    said = []
    save_rules.save_dir_problems(str(d), str(d), 2, False, "pretrain", said.append)
    assert said == [f"note: --ckpt-step 2: {marker} is missing; this run resumes iter_0000002 and replaces "
                    "iter_0000004 as it reaches them (to keep them, resume into a new --save)"]
    assert _digest(d) == before


@pytest.mark.timeout(300)
def test_requeue_resumes_its_own_save_and_train_iters_0_writes_nothing(vl_data, trained, tmp_path, monkeypatch,
                                                                       capsys):
    """Item 3: a requeued --load A --save B (same command line) resumes B when B's checkpoints record
    that their run started from A; --ckpt-step (A's numbering) with that redirect is refused; B
    without that record is refused as before. Item 5: --train-iters 0 writes no checkpoint."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained, a)
    (a / "latest").write_text("iter_0000002")
    job = ("--load", a, "--save", b, "--save-interval", 2)
    code, out = run(vl_data, monkeypatch, capsys, *job, iters=4)
    assert code == 0, out[-3000:]
    assert json.loads((b / "iter_0000004" / save_rules.ORIGIN).read_text()) == {"load": str(a), "iteration": 2}
    before = _digest(b)
    code, out = run(vl_data, monkeypatch, capsys, *job, iters=4)   # the requeue
    assert code == 0, out[-3000:]
    assert (f"{b} holds checkpoint iter_0000004 of this run (started from {a} at iter_0000002): "
            f"resuming from it, not from {a}") in out
    assert f"loaded checkpoint {b}/iter_0000004" in out and _digest(b) == before
    code, out = run(vl_data, monkeypatch, capsys, *job, "--ckpt-step", 2, iters=4)
    assert code == 1
    assert (f"error: --ckpt-step 2 numbers the checkpoints of --load {a}, but --save {b} already holds iter_0000004 "
            f"of this run, which a restart resumes instead") in out
    # a run resumed from B inherits B's origin; B's origin elsewhere (or none) is refused
    assert save_rules.run_origin(str(b), str(b), None, False) == {"load": str(a), "iteration": 2}
    (b / "iter_0000004" / save_rules.ORIGIN).write_text(json.dumps({"load": str(tmp_path / "other"), "iteration": 2}))
    code, out = run(vl_data, monkeypatch, capsys, *job, iters=4)
    assert code == 1 and (f"error: --save {b} holds iter_0000004, newer than what --load {a} starts from "
                          f"(iter_0000002): this run would overwrite it") in out
    # Item 5: validation only
    v = tmp_path / "v"
    code, out = run(vl_data, monkeypatch, capsys, "--save", v, iters=0)
    assert code == 0, out[-3000:]
    assert f"no iteration trained (at 0 of --train-iters 0): no checkpoint written to {v}" in out
    assert not list_tags(str(v)) and not (v / "latest").exists()


def test_save_holding_the_start_iteration_is_refused(tmp_path):
    """Item 4: --load A --save B where B holds A's iteration (written by another run): refused, not
    replaced at the final save; the same directory (a rewind) stays allowed."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "iter_0000004").mkdir(parents=True)
        (d / "latest").write_text("iter_0000004")
    with pytest.raises(CheckpointError, match=rf"--save {b} holds iter_0000004, written by another run at the "
                       rf"iteration that --load {a} starts from \(iter_0000004\): this run would overwrite it"):
        save_rules.save_dir_problems(str(b), str(a), None, False, "pretrain")
    save_rules.save_dir_problems(str(b), str(b), None, False, "pretrain")


def test_a_failed_write_on_another_rank_stops_this_one(tmp_path, monkeypatch):
    """Item 2, in-process: rank 0 wrote its part, rank 1 failed: rank 0 learns it from the
    agreement, removes the uncommitted tag and stops with one line; `latest` unchanged."""
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "iter_0000002" / "part.pt").write_text("x")
    (tmp_path / "latest").write_text("iter_0000001")
    monkeypatch.setattr(checkpointing, "_ranks_with", lambda failed: [1])
    from megatron_vl.errors import OutputError
    with pytest.raises(OutputError) as info:
        _agree_or_raise(lambda: None, str(tmp_path), "iter_0000002")
    assert str(info.value) == (f"rank 1 failed to write its part of iter_0000002 in {tmp_path}: see its error; "
                               f"removed the incomplete iter_0000002; {tmp_path}/latest still names iter_0000001")
    assert not (tmp_path / "iter_0000002").exists() and (tmp_path / "latest").read_text() == "iter_0000001"


def test_every_local_rank_checks_the_build_lock(tmp_path, monkeypatch):
    """Item 8: a stale JIT build lock stops every rank with the same line before the rendezvous
    (local rank 0 alone stopping would leave the others waiting in it)."""
    from megatron_vl.config import load_config
    from megatron_vl.parallel import launcher, state
    from megatron_vl.training import engine, preflight
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    monkeypatch.setattr(preflight, "stale_build_locks", lambda log=print: [str(lock)])
    monkeypatch.setattr(launcher, "detect_launch", lambda: launcher.LaunchInfo("slurm", 1, 2, 1, "127.0.0.1", 29500))

    def rendezvous(*a, **kw):
        raise AssertionError("reached the rendezvous")
    monkeypatch.setattr(state, "init_distributed", rendezvous)
    cfg, _ = load_config([])
    with pytest.raises(preflight.StaleBuildLock, match=rf"{lock}: left by a JIT extension build"):
        engine.start_process(cfg, lambda world: None)

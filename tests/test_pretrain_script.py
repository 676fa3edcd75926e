"""pretrain_vlgpt.py as users run it: under the deepspeed launcher and torchrun, stopped by
SIGTERM, killed in the middle of a save, fed a NaN loss, given a layout it must refuse,
and learning on the sample data."""

import glob
import math
import os
import signal
import time

import pytest
import torch

from megatron_vl.testing import processes
from megatron_vl.testing.distributed import free_port
from pretrain_helpers import PY, ROOT, VOCAB, logged_losses, pretrain_in_process, run_script, script_env, tiny_args


def _module_weights(ckpt_dir, tag):
    sd = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return {k: v.clone() for k, v in sd.items()}


LAUNCHERS = {
    "deepspeed": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "pretrain_vlgpt.py"],
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "pretrain_vlgpt.py"],
}
LAYOUTS = {"zero3-lora": ["--zero-stage", 3, "--lora-rank", 4], "tp2": ["--tensor-model-parallel-size", 2]}
LAYOUT_OF_LAUNCHER = {"deepspeed": "zero3-lora", "torchrun": "tp2"}
RESUME_LAUNCHER = {"deepspeed": "torchrun", "torchrun": "torchrun"}
"""The launcher of the resumed run: torchrun for both (a checkpoint written under the deepspeed
launcher is read under torchrun; the deepspeed launcher's start and exit cost ~5 s more)."""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_trains_saves_and_resumes_exactly(vl_data, tmp_path, launcher):
    """The acceptance runs: ZeRO-3 + LoRA under deepspeed, TP=2 under torchrun, train 4 steps
    and save; new processes (under torchrun) resume from step 2 and log exactly the straight
    run's lines. (Each layout also resumes exactly in-process under both kinds of group:
    test_pretrain.)"""
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    for name in [LAYOUT_OF_LAUNCHER[launcher]]:
        layout = LAYOUTS[name]
        ckpt = tmp_path / name
        args = tiny_args(vl_data, "--global-batch-size", 4, *layout, "--tensorboard-dir", tmp_path / f"tb-{name}")
        out = run_script(LAUNCHERS[launcher](free_port()) + args + ["--save", ckpt, "--save-interval", 2])
        assert f"launcher: {launcher} (rank 0 of 2, local rank 0, master 127.0.0.1:" in out
        assert ("world 2 = tp 2 x pp 1 x dp 1" if name == "tp2" else "world 2 = tp 1 x pp 1 x dp 2, ZeRO-3") in out
        straight = logged_losses(out)
        assert sorted(straight) == [1, 2, 3, 4]
        resumed_out = run_script(LAUNCHERS[RESUME_LAUNCHER[launcher]](free_port()) + args
                                 + ["--load", ckpt, "--ckpt-step", 2])
        assert f"launcher: {RESUME_LAUNCHER[launcher]} (rank 0 of 2" in resumed_out
        assert f"loaded checkpoint {ckpt}/iter_0000002 (iteration 2, 8 samples consumed)" in resumed_out
        assert logged_losses(resumed_out) == {i: straight[i] for i in (3, 4)}, name
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / f"tb-{name}"))
    # DeepSpeed's shared-memory allreduce buffers (66 MB a rank, deepspeed launcher) are not left behind.
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before


def test_both_preemption_signals_request_the_stop():
    """SIGTERM (scancel) and SIGUSR1 (sbatch --signal=USR1@120) reach the same stop request;
    the whole path, save and exit 0 and resume, runs below with SIGUSR1."""
    from megatron_vl.training.engine import StopRequest
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in before:
            stop = StopRequest()
            assert stop.signal is None
            os.kill(os.getpid(), sig)
            assert stop.signal == sig
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGUSR1])
def test_preemption_signal_saves_exits_zero_and_resume_continues(vl_data, tmp_path, sig):
    """Two ranks started as srun starts them (SLURM variables only: the master host comes
    from the node list, the port from the job id); rank 0 alone gets the signal — SIGTERM
    as from scancel, SIGUSR1 as from sbatch --signal=USR1@120."""
    port = free_port()
    while port >= 60000:   # the job id -> port rule (20000 + id % 40000) must give it back
        port = free_port()
    args = tiny_args(vl_data, "--global-batch-size", 4, "--save", tmp_path, iters=500)
    slurm = dict(SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost",
                 SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID=str(port - 20000), SLURM_STEP_ID="0")
    procs = [processes.start_process([PY, "pretrain_vlgpt.py", *args], cwd=ROOT, capture=True, merge_stderr=True,
                                     env=script_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm))
             for r in range(2)]
    try:
        seen = []
        for line in procs[1].stdout:
            seen.append(line)
            if line.startswith("iteration") and line.split("/")[0].split()[1] == "3":
                procs[0].send_signal(sig)
                break
        rest1, _ = procs[1].communicate(timeout=120)
        out0, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out1 = "".join(seen) + rest1
    assert [p.returncode for p in procs] == [0, 0], out0[-3000:] + out1[-3000:]
    assert f"launcher: slurm (rank 0 of 2, local rank 0, master localhost:{port}, job {port - 20000}" in out0
    tag = open(tmp_path / "latest").read()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 500
    assert f"stopping at iteration {stopped_at} on a termination signal" in out0
    straight = logged_losses(out1)
    assert max(straight) == stopped_at

    out = run_script(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "pretrain_vlgpt.py",
                      *map(str, tiny_args(vl_data, "--global-batch-size", 4, "--load", tmp_path,
                                          "--exit-interval", stopped_at + 2, iters=500))])
    assert f"(iteration {stopped_at}, {4 * stopped_at} samples consumed)" in out
    assert sorted(logged_losses(out)) == [stopped_at + 1, stopped_at + 2]


@pytest.mark.timeout(200)
def test_kill_during_save_leaves_previous_checkpoint(vl_data, tmp_path, monkeypatch, capsys):
    args = ["pretrain_vlgpt.py", *tiny_args(vl_data, "--save", tmp_path, "--save-interval", 2, iters=6)]
    run_script([PY, *args], expect=-signal.SIGKILL, MEGATRON_VL_INJECT="kill_during_save@4")
    assert open(tmp_path / "latest").read() == "iter_0000002"
    assert os.path.isdir(tmp_path / "iter_0000004")       # the half-written one is there, but not named
    # The resume in this process (a process's imports saved): it reads only the checkpoint.
    code, out = pretrain_in_process(tiny_args(vl_data, "--load", tmp_path, "--save", tmp_path, "--save-interval", 2,
                                              "--keep-last", 1, iters=6), monkeypatch, capsys)
    assert code == 0, out[-3000:]
    assert f"loaded checkpoint {tmp_path}/iter_0000002 (iteration 2, 4 samples consumed)" in out
    assert sorted(logged_losses(out)) == [3, 4, 5, 6]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("iter_")) == ["iter_0000006"]  # --keep-last 1


@pytest.mark.timeout(200)
def test_nan_loss_skips_update_counts_it_and_aborts_after_the_limit(vl_data, tmp_path, monkeypatch, capsys):
    """In this process (the script's exit status is run()'s, which pretrain_in_process returns)."""
    args = tiny_args(vl_data, "--save", tmp_path, "--save-interval", 1, "--max-skipped-steps", 2, iters=8)
    monkeypatch.setenv("MEGATRON_VL_INJECT", "nan_loss@2,4,5,6")
    code, out = pretrain_in_process(args, monkeypatch, capsys)
    assert code == 1, out[-3000:]
    assert "error: iteration 6: 3 consecutive updates skipped for a non-finite loss or gradient norm " \
           "(--max-skipped-steps 2); aborting" in out
    skipped = {int(l.split("/")[0].split()[1]): int(l.split("skipped: ")[1].split()[0])
               for l in out.splitlines() if l.startswith("iteration")}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 2, 5: 3}
    # The skipped update left the weights as they were; the next one changed them.
    w1, w2, w3 = (_module_weights(tmp_path, f"iter_000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)


@pytest.mark.timeout(60)
def test_zero3_with_pipeline_is_refused_before_any_process_group(vl_data):
    """WORLD_SIZE=2 with no peer and no MASTER_ADDR: any process-group work would hang or
    fail differently; the refusal comes first."""
    start = time.monotonic()
    out = run_script([PY, "pretrain_vlgpt.py", *map(str, tiny_args(vl_data, "--zero-stage", 3,
                                                                    "--pipeline-model-parallel-size", 2))],
                     expect=2, WORLD_SIZE="2", RANK="0")
    assert "--zero-stage 3 with --pipeline-model-parallel-size 2: DeepSpeed cannot combine ZeRO-2/3 with " \
           "pipeline parallelism" in out
    assert time.monotonic() - start < 50


@pytest.mark.timeout(200)
def test_loss_falls_on_the_sample_data_within_50_iterations(vl_data, monkeypatch, capsys):
    code, out = pretrain_in_process(tiny_args(vl_data, "--eval-interval", 25, iters=50), monkeypatch, capsys)
    assert code == 0, out[-3000:]
    losses = logged_losses(out)
    lm = [float(losses[i][1]) for i in sorted(losses)]
    visual = [float(losses[i][2]) for i in sorted(losses)]
    uniform = math.log(VOCAB)
    # Starts near a uniform guess over the vocabulary, ends well below it.
    assert abs(lm[0] - uniform) < 0.3
    assert sum(lm[-5:]) / 5 < uniform - 0.5
    assert sum(visual[-5:]) / 5 < 0.7 * sum(visual[:5]) / 5
    valid = [float(l.split("lm loss: ")[1].split()[0]) for l in out.splitlines() if l.startswith("validation")]
    assert len(valid) == 2 and valid[1] < valid[0]


@pytest.mark.timeout(120)
def test_bad_settings_are_refused_with_the_reason(vl_data, tmp_path, monkeypatch, capsys):
    # The script exits 2 with the reason (one process; the other cases in-process, same job).
    out = run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, "--vocab-size", 200)], expect=2)
    assert ("error: the datasets' tokenizer has 258 tokens (with [IMG]/[/IMG]) but --vocab-size is 200; set "
            "--vocab-size 258") in out
    cases = [(["--visual-embed-dim", 48], "the datasets' image features have width 32 but --visual-embed-dim is 48")]
    if not torch.cuda.is_available():
        cases.append((["--fp16"], "--fp16 needs a CUDA device"))
    for extra, message in cases:
        code, out = pretrain_in_process(tiny_args(vl_data, *extra), monkeypatch, capsys)
        assert code == 2 and f"error: {message}" in out, out[-2000:]
    # A missing --load is a missing checkpoint: exit 1 (tests/test_console.py times it).
    code, out = pretrain_in_process(tiny_args(vl_data, "--load", tmp_path / "missing"), monkeypatch, capsys)
    assert code == 1 and f"error: --load {tmp_path / 'missing'}: no such directory" in out, out[-2000:]

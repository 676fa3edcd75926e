"""A tiny VL-GPT run on data the tests build themselves (the corpus and the flags:
megatron_vl.testing.tiny_data), in this process, in gloo ranks or as a script."""

import os
import re
import sys

from data_helpers import ROOT
from megatron_vl.testing import processes
from megatron_vl.testing.tiny_data import EMBED_DIM, NUM_IMAGE_TOKENS, VOCAB, build_vl_data, tiny_args  # noqa: F401


def pretrain_rank(rank, world, argv, perturb_init=False):
    """One rank of a pretraining run (inside testing.distributed.run_distributed); returns
    the per-iteration history from the reporting (last) rank. perturb_init shifts every
    initial weight, so a resumed run only matches if the checkpoint restored them all."""
    if perturb_init:
        import megatron_vl.training.build as build
        original = build.iter_initial_weights
        build.iter_initial_weights = lambda *a, **kw: ((k, v + 0.05) for k, v in original(*a, **kw))
    from megatron_vl.training.pretrain import pretrain
    trainer = pretrain(argv)
    assert trainer.exit_code == 0, f"exit code {trainer.exit_code}"
    return trainer.history if rank == world - 1 else None


def pretrain_in_process(argv, monkeypatch, capsys):
    """pretrain_vlgpt.py's job in this process, one rank (no interpreter start, no imports:
    a process costs ~8 s of them): (exit code, everything printed)."""
    from megatron_vl.testing.distributed import one_rank_job
    from megatron_vl.training import pretrain as pt
    from megatron_vl.training.engine import exit_code
    capsys.readouterr()
    code = one_rank_job(lambda: exit_code(lambda: pt.pretrain([str(a) for a in argv])), monkeypatch.setenv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def pretrain_runs(rank, world, argvs):
    """pretrain_rank for each argv in turn, in one set of processes (one spawn, one import)."""
    return [pretrain_rank(rank, world, argv) for argv in argvs]


def script_env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)


def run_script(cmd, expect=0, timeout=240, **env):
    """cmd run to its end from the checkout (script_env(**env)); checks its exit code, returns
    stdout + stderr. A run past timeout is killed with every process it started."""
    return processes.run_script(cmd, cwd=ROOT, env=script_env(**env), timeout=timeout, expect=expect).output


LINE = re.compile(r"^iteration\s+(\d+)/\d+ \| consumed samples: (\d+) \| lm loss: (\S+) \| visual loss: (\S+)", re.M)


def logged_losses(output):
    """{iteration: (consumed samples, lm loss, visual loss)} from the console lines, exactly
    as printed (9 significant digits: a float32 bit for bit)."""
    return {int(m[0]): (int(m[1]), m[2], m[3]) for m in LINE.findall(output)}


PY = sys.executable

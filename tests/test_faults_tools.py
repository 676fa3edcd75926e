"""Reliability sweep 2, the small tools: the planner honours or refuses every layout flag and
range-checks every number (L04, L05, L08); plot_loss never writes over its log or a file it did
not make, and names a missing file in one line (PL1-PL6); the sample and tiny-model makers do
not write over a folder's files without --overwrite (MS1, MS2)."""

import hashlib
import importlib.util
import os
import sys

import pytest

from megatron_vl.errors import run_cli
from megatron_vl.testing import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_tools = {}


def tool(name):
    """tools/<name>.py as a module (loaded once)."""
    if name not in _tools:
        spec = importlib.util.spec_from_file_location(f"_faults_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _tools[name] = module
    return _tools[name]


def cli(capsys, name, *argv):
    """(exit code, stdout, stderr) of the tool's main through run_cli, as its __main__ runs it."""
    capsys.readouterr()
    code = run_cli(tool(name).main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---- planner ------------------------------------------------------------------------------

MODEL = ["--hidden-size", "64", "--num-layers", "2", "--num-attention-heads", "4", "--ffn-hidden-size", "176",
         "--vocab-size", "258", "--seq-length", "256", "--global-batch-size", "8"]


def _rows(out):
    return [line.split() for line in out.splitlines() if line[:3].strip().isdigit() and "|" in line]


def test_plan_refuses_a_tensor_parallel_size_nothing_divides(capsys):
    # L04: TP 3 used to be ignored (a table of TP 1/2/4 layouts); now each reason is named.
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--tensor-model-parallel-size", "3")
    assert code == 2 and not out
    assert "--num-attention-heads (4) is not divisible by --tensor-model-parallel-size (3)" in err
    assert "--gpus (8) is not divisible by --tensor-model-parallel-size (3)" in err


def test_plan_searches_only_the_layout_flags_given(capsys):
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--tensor-model-parallel-size", "2",
                         "--zero-stage", "2", "--no-recompute-activations", "--top", "100")
    assert code == 0, err
    rows = _rows(out)
    assert rows and {(r[0], r[3], r[5]) for r in rows} == {("2", "2", "no")}
    assert {r[1] for r in rows} == {"1"}            # ZeRO-2 cannot pipeline
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--pipeline-model-parallel-size", "2",
                         "--micro-batch-size", "2", "--top", "100")
    assert code == 0, err
    assert {(r[1], r[3], r[4]) for r in _rows(out)} == {("2", "1", "2")}
    # Flags that fit separately but not together: the search says what it was asked for.
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--tensor-model-parallel-size", "2",
                         "--micro-batch-size", "4", "--global-batch-size", "4")
    assert code == 2 and "no layout" in err and "--tensor-model-parallel-size 2, --micro-batch-size 4" in err


def test_plan_refuses_gpus_that_are_not_whole_nodes(capsys):
    # L05: 8 GPUs in nodes of 3 used to be planned.
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--gpus-per-node", "3")
    assert code == 2 and not out
    assert "--gpus 8 is not a whole number of nodes of --gpus-per-node 3" in err
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "2", "--gpus-per-node", "3")
    assert code == 0, err                           # less than one node is fine


@pytest.mark.parametrize("flags, named", [
    (["--kernel-efficiency", "0"], "--kernel-efficiency 0"),           # L08: was ZeroDivisionError
    (["--kernel-efficiency", "1.5"], "--kernel-efficiency 1.5"),
    (["--kernel-efficiency", "nan"], "--kernel-efficiency nan"),
    (["--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--gpu-memory-gib", "-1"], "--gpu-memory-gib -1"),
    (["--intra-node-gbps", "0"], "--intra-node-gbps 0"),
    (["--inter-node-gbps", "inf"], "--inter-node-gbps inf"),
    (["--peak-tflops", "0"], "--peak-tflops 0"),
    (["--reserved-gib", "-2"], "--reserved-gib -2"),
    (["--reserved-gib", "40"], "--reserved-gib 40 leaves nothing"),
    (["--top", "0"], "--top 0"),
    (["--gpus", "-4"], "--gpus -4"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0"),
    (["--global-batch-size", "-8"], "--global-batch-size -8"),
    (["--num-attention-heads", "0"], "--num-attention-heads 0"),
    (["--seq-length", "0"], "--seq-length 0"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size 0"),
    (["--pipeline-model-parallel-size", "3"], "--num-layers (2) is not divisible by --pipeline-model-parallel-size"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], "DeepSpeed cannot combine ZeRO-2/3"),
])
def test_plan_range_checks_every_number(capsys, flags, named):
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", *flags)
    assert code == 2 and not out
    assert err.startswith("error: ") and named in err


def test_plan_honours_the_deepspeed_json_stage(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--deepspeed_config", ds, "--top", "100")
    assert code == 0, err
    assert {r[3] for r in _rows(out)} == {"3"}
    code, out, err = cli(capsys, "plan_parallelism", *MODEL, "--gpus", "8", "--deepspeed_config", ds,
                         "--zero-stage", "1")
    assert code == 2 and "--zero-stage 1 disagrees with --deepspeed_config" in err


# ---- plot_loss ----------------------------------------------------------------------------

LOG = ("iteration        1/2 | consumed samples: 4 | lm loss: 5.5E+00 | visual loss: 2.0E-01 | learning rate: 1E-3\n"
       "iteration        2/2 | consumed samples: 8 | lm loss: 4.5E+00 | visual loss: 1.0E-01 | learning rate: 1E-3\n")


def test_plot_loss_never_writes_over_its_log(capsys, tmp_path):
    # PL4: --output = --log replaced the log with the PNG; refused even with --overwrite.
    log = tmp_path / "train.log"
    log.write_text(LOG)
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "plot_loss", "--log", log, "--output", log, *extra)
        assert code == 1 and "is also an input of this run" in err
        assert log.read_text() == LOG


def test_plot_loss_replaces_only_its_own_plot(capsys, tmp_path):
    log, png, user = tmp_path / "train.log", tmp_path / "loss.png", tmp_path / "notes.png"
    log.write_text(LOG)
    user.write_bytes(b"the user's own file")
    code, _, err = cli(capsys, "plot_loss", "--log", log, "--output", user)
    assert code == 1 and "already exists and this run did not make it" in err and "--overwrite" in err
    assert user.read_bytes() == b"the user's own file"
    assert cli(capsys, "plot_loss", "--log", log, "--output", png)[0] == 0
    assert cli(capsys, "plot_loss", "--log", log, "--output", png)[0] == 0      # its own plot: a rerun replaces it
    assert cli(capsys, "plot_loss", "--log", log, "--output", user, "--overwrite")[0] == 0
    assert user.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "notes.png", "train.log"]   # no temporary left


def test_plot_loss_names_a_missing_log_or_folder_in_one_line(tmp_path):
    # PL3/PL5: the message used to arrive inside a traceback; a real interpreter shows what a user sees.
    log = tmp_path / "train.log"
    log.write_text(LOG)
    cases = [(["--log", tmp_path / "missing.log", "--output", tmp_path / "a.png"], "--log", "no such file"),
             (["--log", log, "--output", tmp_path / "nodir" / "a.png"], "nodir", "does not exist"),
             (["--log", tmp_path, "--output", tmp_path / "a.png"], "--log", "is a directory")]
    for argv, named, reason in cases:
        proc = processes.run_script([sys.executable, os.path.join(ROOT, "tools", "plot_loss.py"), *argv], timeout=60)
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
        assert named in proc.stderr and reason in proc.stderr


def test_plot_loss_refuses_logs_without_losses(capsys, tmp_path):
    # PL1/PL2/PL6: empty, garbage, a stage-1 log; and a line whose numbers are garbled is skipped.
    for i, text in enumerate(["", "\x00\xff garbage", "stage1 iteration 1 | loss 0.5\n"]):
        log = tmp_path / f"{i}.log"
        log.write_text(text)
        code, _, err = cli(capsys, "plot_loss", "--log", log, "--output", tmp_path / f"{i}.png")
        assert code == 1 and f"{log}: no 'iteration N/M" in err
        assert not os.path.exists(tmp_path / f"{i}.png")
    log = tmp_path / "garbled.log"
    log.write_text(LOG + LOG.replace("4.5E+00", "4.5E+0iteration").replace("2/2", "3/3"))
    code, out, err = cli(capsys, "plot_loss", "--log", log, "--output", tmp_path / "g.png")
    assert code == 0 and "skipped 1 loss line" in err


# ---- sample data and tiny LLaMA makers ----------------------------------------------------

SAMPLE = ["--documents", "2", "--pairs", "2", "--instruct", "0"]


def test_make_sample_data_refuses_a_folder_holding_its_files(capsys, tmp_path):
    # MS1: a folder's own tokenizer.model was overwritten.
    (tmp_path / "tokenizer.model").write_bytes(b"my tokenizer")
    (tmp_path / "tokenizer.vocab").write_bytes(b"my vocab")   # the trainer writes then deletes it
    code, _, err = cli(capsys, "make_sample_data", "--output", tmp_path, *SAMPLE)
    assert code == 1 and "tokenizer.model" in err and "--overwrite" in err
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.model", "tokenizer.vocab"]
    assert (tmp_path / "tokenizer.model").read_bytes() == b"my tokenizer"
    code, _, err = cli(capsys, "make_sample_data", "--output", tmp_path, *SAMPLE, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "tokenizer.model").read_bytes() != b"my tokenizer"
    before = digest(tmp_path / "tokenizer.model")
    code, _, err = cli(capsys, "make_sample_data", "--output", tmp_path, *SAMPLE)   # a rerun: refused too
    assert code == 1 and "mmc4/docs_shard_0_v2.jsonl.zip" in err
    assert digest(tmp_path / "tokenizer.model") == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("kept")   # a folder with unrelated files is fine
    assert cli(capsys, "make_sample_data", "--output", other, *SAMPLE)[0] == 0
    assert (other / "notes.txt").read_text() == "kept"
    code, _, err = cli(capsys, "make_sample_data", "--output", tmp_path / "x", "--pair-shards", "0")
    assert code == 2 and "--pair-shards 0" in err


def test_make_tiny_llama_refuses_a_folder_holding_a_config(capsys, tmp_path):
    # MS2: a folder's config.json was overwritten.
    (tmp_path / "config.json").write_text('{"mine": true}')
    code, _, err = cli(capsys, "make_tiny_llama", "--save", tmp_path)
    assert code == 1 and "--save" in err and "config.json" in err and "--overwrite" in err
    assert os.listdir(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_text() == '{"mine": true}'
    code, _, err = cli(capsys, "make_tiny_llama", "--save", tmp_path, "--overwrite")
    assert code == 0, err
    assert '"mine"' not in (tmp_path / "config.json").read_text()
    code, _, err = cli(capsys, "make_tiny_llama")
    assert code == 2 and "--save DIR is required" in err

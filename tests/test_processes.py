"""megatron_vl.testing.processes: the one way tests and benchmarks start a script. A script that
overruns its time is killed with everything it started (its group, and descendants in sessions
of their own, as torchrun's workers are), and the error names the command and its last output."""

import os
import sys
import time

import pytest

from megatron_vl.testing import processes
from megatron_vl.testing.scripts import load_script, run_main

# Prints its pid and its two children's (one in this group, one in a session of its own, as
# torchrun starts its workers), then waits on them forever.
LAUNCHER = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
kids = [subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True)]
print("pids", *[k.pid for k in kids], flush=True)
print("waiting", file=sys.stderr, flush=True)
time.sleep(120)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_script_past_its_time_is_killed_with_all_it_started(tmp_path):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    start = time.monotonic()
    with pytest.raises(processes.ScriptTimeout) as caught:
        processes.run_script([sys.executable, tmp_path / "launcher.py", "--flag"], timeout=5)
    assert time.monotonic() - start < 30
    message = str(caught.value)
    assert message.startswith(f"{sys.executable} {tmp_path / 'launcher.py'} --flag did not finish in 5 s (killed, ")
    assert message.endswith("waiting\n")   # the output's tail: stdout, then stderr
    pids = [int(p) for p in message.split("pids ")[1].split("\n")[0].split()]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _alive(p)] == []


def test_exit_code_and_output_streams():
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    done = processes.run_script([sys.executable, "-c", code], timeout=60)
    assert (done.returncode, done.stdout, done.stderr, done.output) == (3, "out\n", "err\n", "out\nerr\n")
    merged = processes.run_script([sys.executable, "-c", code], timeout=60, merge_stderr=True, expect=3)
    assert (merged.stdout, merged.stderr) == ("out\nerr\n", None)
    with pytest.raises(processes.ScriptFailed, match=r"-c .* exited 3, expected 0:\nout\nerr\n$"):
        processes.run_script([sys.executable, "-c", code], timeout=60, expect=0)


def test_arguments_env_and_cwd_reach_the_script(tmp_path):
    code = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['MARK'], os.getpgid(0) == os.getpid())"
    done = processes.run_script([sys.executable, "-c", code, tmp_path / "a", 7], cwd=tmp_path,
                                env=dict(os.environ, MARK="here"), timeout=60, expect=0)
    assert done.stdout == f"[{str(tmp_path / 'a')!r}, '7'] {tmp_path} here True\n"   # its own process group


def test_the_checkout_scripts_load_and_run_in_this_process(tmp_path):
    module = load_script("tools/make_sample_data.py")
    assert callable(module.main) and module.__name__ == "_script_make_sample_data"
    code, out = run_main("tools/make_sample_data.py", ["--documents", "0", "--output", str(tmp_path)])
    assert (code, out) == (2, "error: --documents 0: must be at least 1\n")   # a user error: one line
    with pytest.raises(FileNotFoundError, match="tools/no_such_tool.py: no such script"):
        load_script("tools/no_such_tool.py")

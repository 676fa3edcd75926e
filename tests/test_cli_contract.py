"""The contract every entry point keeps (issue 20): a problem the user can fix is one line
`error: ...` on stderr with a documented exit code, never a traceback. Checked as a class:
(1) every tool and top-level script routes its __main__ through errors.run_cli (read with ast,
nothing imported); (2) run_cli's behaviour; (3) the atomic helpers the tools share to keep
their outputs off inputs and to clean up after dead writers."""

import ast
import errno
import glob
import os
import socket
import sys

import pytest

from megatron_vl.atomic import guard_output, guard_output_files, remove_stale_temps
from megatron_vl.errors import InputError, OutputError, UsageError, UserError, run_cli
from megatron_vl.testing import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = sorted(
    [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))]
    + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "*.py")) if os.path.basename(p) != "setup.py"])
# Entry points allowed not to (file -> why). None today.
EXCEPTIONS = {}


# ---- (1) every __main__ goes through run_cli ----------------------------------------------

def _parse(path):
    with open(path) as fh:
        return ast.parse(fh.read(), path)


def _main_block(tree):
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return node
    return None


def _called_name(call):
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _module_file(module, level, here):
    """The file of `from <level dots><module> import ...` written in `here` (our package only)."""
    if level:
        base = os.path.dirname(here)
        for _ in range(level - 1):
            base = os.path.dirname(base)
        parts = module.split(".") if module else []
    elif module and module.split(".")[0] == "megatron_vl":
        base, parts = ROOT, module.split(".")
    else:
        return None
    path = os.path.join(base, *parts)
    return path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")


def _routes(tree, here, name, depth=0):
    """Whether calling `name` (defined in or imported into `here`) ends in run_cli."""
    if name == "run_cli":
        return True
    if depth > 3:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return any(_routes(tree, here, _called_name(c), depth + 1)
                       for c in ast.walk(node) if isinstance(c, ast.Call) and _called_name(c))
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            real = next(a.name for a in node.names if (a.asname or a.name) == name)
            path = _module_file(node.module, node.level, here)
            if path and os.path.isfile(path):
                return real == "run_cli" or _routes(_parse(path), path, real, depth + 1)
    return False


def routes_through_run_cli(rel):
    """'' when `rel`'s __main__ block is sys.exit(<a call that reaches run_cli>), else why not."""
    path = os.path.join(ROOT, rel)
    tree = _parse(path)
    block = _main_block(tree)
    if block is None:
        return "no `if __name__ == \"__main__\":` block"
    exits = [c for c in ast.walk(block) if isinstance(c, ast.Call) and _called_name(c) == "exit"
             and c.args and isinstance(c.args[0], ast.Call)]
    if not exits:
        return "its __main__ block does not end in sys.exit(<call>)"
    for c in exits:
        if _routes(tree, path, _called_name(c.args[0])):
            return ""
    return f"sys.exit({_called_name(exits[0].args[0])}(...)) does not reach errors.run_cli"


def test_entry_point_list_covers_the_scripts():
    for must in ("pretrain_vlgpt.py", "finetune_instruct.py", "train_tokenizer.py", "tools/plan_parallelism.py"):
        assert must in ENTRY_POINTS


@pytest.mark.parametrize("rel", ENTRY_POINTS)
def test_entry_point_main_goes_through_run_cli(rel):
    if rel in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[rel])
    why = routes_through_run_cli(rel)
    assert not why, f"{rel}: {why}; end it with `sys.exit(run_cli(main))` (megatron_vl.errors)"


def test_the_static_check_tells_a_converted_script_from_a_bare_one(tmp_path):
    # The checker itself: a bare main, a main through run_cli, and one through a helper module.
    bare = "import sys\ndef main(argv=None):\n    return 0\nif __name__ == '__main__':\n    sys.exit(main())\n"
    good = ("import sys\nfrom megatron_vl.errors import run_cli\ndef main(argv=None):\n    return 0\n"
            "if __name__ == '__main__':\n    sys.exit(run_cli(main))\n")
    via = "import sys\nfrom megatron_vl.training.pretrain import run\nif __name__ == '__main__':\n    sys.exit(run())\n"
    for name, text, ok in (("bare.py", bare, False), ("good.py", good, True), ("via.py", via, True)):
        (tmp_path / name).write_text(text)
        assert (routes_through_run_cli(str(tmp_path / name)) == "") is ok, name


# ---- (2) run_cli ----------------------------------------------------------------------------

def _raiser(exc):
    def main(argv=None):
        raise exc
    return main


@pytest.mark.parametrize("exc, code", [(UserError("the thing is wrong"), 1), (UsageError("the thing is wrong"), 2),
                                       (InputError("the thing is wrong"), 1), (OutputError("the thing is wrong"), 1)])
def test_run_cli_prints_a_user_error_as_one_line(capsys, monkeypatch, exc, code):
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)
    assert run_cli(_raiser(exc), []) == code
    out, err = capsys.readouterr()
    assert err == "error: the thing is wrong\n" and not out


def test_run_cli_debug_reraises(monkeypatch):
    monkeypatch.setenv("MEGATRON_VL_DEBUG", "1")
    with pytest.raises(UsageError):
        run_cli(_raiser(UsageError("x")), [])


def test_run_cli_names_a_full_disk(capsys, monkeypatch):
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")
    assert run_cli(_raiser(full), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device writing /data/out.bin") and err.count("\n") == 1
    # torch.save's C++ writer says it as an iostream error.
    assert run_cli(_raiser(RuntimeError("[enforce fail] basic_ios::clear: iostream error")), []) == 1
    assert "no space left on the device" in capsys.readouterr().err


def test_run_cli_lets_a_bug_through(monkeypatch):
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)
    with pytest.raises(KeyError):
        run_cli(_raiser(KeyError("answers")), [])
    assert run_cli(lambda argv: None, []) == 0 and run_cli(lambda argv: 3, []) == 3


def test_run_cli_in_a_real_interpreter_has_no_traceback():
    code = ("import sys; from megatron_vl.errors import run_cli, InputError\n"
            "def main(argv=None):\n    raise InputError('data.bin: cut short')\n"
            "sys.exit(run_cli(main))\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MEGATRON_VL_DEBUG", None)
    proc = processes.run_script([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == 1 and proc.stderr == "error: data.bin: cut short\n"
    proc = processes.run_script([sys.executable, "-c", code], timeout=60, env=dict(env, MEGATRON_VL_DEBUG="1"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr


# ---- (3) atomic helpers ---------------------------------------------------------------------

def test_remove_stale_temps_removes_only_dead_writers_files(tmp_path):
    dead = processes.start_process([sys.executable, "-c", "pass"])
    dead.wait()
    live = processes.start_process([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        names = {"dead": f"out.bin.tmp{dead.pid}-{host}", "live": f"out.bin.tmp{live.pid}-{host}",
                 "other_host": f"out.bin.tmp{dead.pid}-elsewhere.example", "final": "out.bin"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f"shard.tmp{dead.pid}-{host}").mkdir()       # a temporary folder (exports)
        said = []
        removed = remove_stale_temps(str(tmp_path), log=said.append)
        assert sorted(map(os.path.basename, removed)) == sorted([names["dead"], f"shard.tmp{dead.pid}-{host}"])
        assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["other_host"], names["final"]])
        assert len(said) == 2 and f"pid {dead.pid}" in said[0]
    finally:
        live.kill()
        live.wait()


def test_guard_output(tmp_path):
    src, out = tmp_path / "in.log", tmp_path / "out.png"
    src.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is also an input"):
            guard_output(str(src), inputs=[str(src)], overwrite=overwrite)
        with pytest.raises(OutputError, match="is also an input"):   # the same file under another name
            guard_output(str(tmp_path / "." / "in.log"), inputs=[str(src)], overwrite=overwrite)
    guard_output(str(out), inputs=[str(src)])                        # new file: fine
    out.write_text("y")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        guard_output(str(out), inputs=[str(src)])
    guard_output(str(out), inputs=[str(src)], overwrite=True)
    with pytest.raises(OutputError, match="out.png"):
        guard_output_files(str(tmp_path), ["new.txt", "out.png"], flag="--save")
    guard_output_files(str(tmp_path), ["new.txt", "out.png"], overwrite=True)


def test_lock_of_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch, capsys):
    # A requeued job may land on another node: the lock of its killed attempt names another host.
    import json
    from megatron_vl.atomic import LockHeld, exclusive_lock
    lock = tmp_path / "save.lock"
    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "started": "x", "command": "c",
                                "slurm_job": "77", "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LockHeld, match="other-node"):     # the same attempt: a second run, refused
        with exclusive_lock(str(lock), "the checkpoint directory"):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(LockHeld):                         # another job: refused
        with exclusive_lock(str(lock), "the checkpoint directory"):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with exclusive_lock(str(lock), "the checkpoint directory"):
        assert json.loads(lock.read_text())["slurm_restart"] == 1
    assert "taking over" in capsys.readouterr().out and not lock.exists()


# ---- the lock's owner is gone: heartbeat, pid reuse, restarted pid namespaces ----------------

def _lock_file(path, **owner):
    import json
    path.write_text(json.dumps(dict({"started": "then", "command": "pretrain_vlgpt.py old"}, **owner)))
    return str(path)


def _ago(path, seconds):
    import time
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_a_silent_lock_from_another_host_is_taken_over_and_a_beating_one_is_not(tmp_path, monkeypatch, capsys):
    # A chained job (a new SLURM job id) or a restarted pod lands on another host after a kill -9.
    from megatron_vl.atomic import LockHeld, exclusive_lock
    lock = _lock_file(tmp_path / "training.lock", host="other-node", pid=4242, heartbeat=30)
    with pytest.raises(LockHeld, match="other-node, pid 4242"):   # beating: a live run elsewhere
        with exclusive_lock(lock, "checkpoint directory x"):
            pass
    _ago(lock, 1000)
    with exclusive_lock(lock, "checkpoint directory x"):
        pass
    out = capsys.readouterr().out
    assert f"note: taking over {lock}, left by a run (host other-node, pid 4242: pretrain_vlgpt.py old) whose " \
           "heartbeat has been silent for 17 min" in out and not os.path.exists(lock)
    # the threshold follows the environment, never below twice the owner's own period
    monkeypatch.setenv("MEGATRON_VL_LOCK_STALE_SECONDS", "1")
    _lock_file(tmp_path / "training.lock", host="other-node", pid=4242, heartbeat=30)
    _ago(lock, 10)
    with pytest.raises(LockHeld, match="other-node"):
        with exclusive_lock(lock, "checkpoint directory x"):
            pass
    _lock_file(tmp_path / "training.lock", host="other-node", pid=4242, heartbeat=0.1)
    _ago(lock, 10)
    with exclusive_lock(lock, "checkpoint directory x"):
        pass
    assert "silent for 10 s" in capsys.readouterr().out
    # a lock of an older version (no heartbeat) from another host keeps the old rule: refused
    _lock_file(tmp_path / "training.lock", host="other-node", pid=4242)
    _ago(lock, 1000)
    with pytest.raises(LockHeld, match="other-node"):
        with exclusive_lock(lock, "checkpoint directory x"):
            pass
    monkeypatch.setenv("MEGATRON_VL_LOCK_STALE_SECONDS", "soon")
    _lock_file(tmp_path / "training.lock", host="other-node", pid=4242, heartbeat=30)
    with pytest.raises(UsageError, match="MEGATRON_VL_LOCK_STALE_SECONDS='soon'"):
        with exclusive_lock(lock, "checkpoint directory x"):
            pass


def test_a_lock_naming_this_pid_is_a_leftover_of_a_restarted_container(tmp_path, capsys):
    # In a container restarted with its own pid namespace the new process often gets its old pid.
    from megatron_vl.atomic import exclusive_lock
    host = socket.gethostname()
    lock = _lock_file(tmp_path / "p.lock", host=host, pid=os.getpid())
    with exclusive_lock(lock, "dataset prefix p"):
        pass
    assert "left by an earlier process with this pid" in capsys.readouterr().out and not os.path.exists(lock)
    # one lock under two names (a symlinked folder) is re-entered, not taken from itself
    (tmp_path / "alias").symlink_to(tmp_path)
    with exclusive_lock(lock, "dataset prefix p"):
        with exclusive_lock(str(tmp_path / "alias" / "p.lock"), "dataset prefix p"):
            pass
        assert os.path.exists(lock)
    assert not os.path.exists(lock)


def test_a_lock_whose_pid_is_now_another_process_is_taken_over(tmp_path, capsys):
    from megatron_vl.atomic import LockHeld, exclusive_lock
    host, lock = socket.gethostname(), str(tmp_path / "p.lock")
    # The old pid may now be another process (its start time differs), or predate a reboot.
    other = processes.start_process([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(f"/proc/{other.pid}/stat") as fh:
            start = int(fh.read().rsplit(")", 1)[1].split()[19])   # field 22: start time, in ticks
        _lock_file(tmp_path / "p.lock", host=host, pid=other.pid, proc_start=start)   # that very process
        with pytest.raises(LockHeld, match=f"pid {other.pid}"):
            with exclusive_lock(lock, "dataset prefix p"):
                pass
        _lock_file(tmp_path / "p.lock", host=host, pid=other.pid, proc_start=start - 1)   # an earlier one
        with exclusive_lock(lock, "dataset prefix p"):
            pass
        assert f"pid {other.pid} is now another process" in capsys.readouterr().out
        if os.path.exists("/proc/sys/kernel/random/boot_id"):
            _lock_file(tmp_path / "p.lock", host=host, pid=other.pid, proc_start=start, boot_id="an-earlier-boot")
            with exclusive_lock(lock, "dataset prefix p"):
                pass
            assert "from before this host last started" in capsys.readouterr().out
    finally:
        other.kill()
        other.wait()


def test_the_heartbeat_refreshes_a_held_lock_and_stops_with_the_block(tmp_path, monkeypatch):
    import json
    import threading
    import time
    from megatron_vl import atomic
    monkeypatch.setattr(atomic, "HEARTBEAT_SECONDS", 0.05, raising=False)
    lock = str(tmp_path / "training.lock")

    def beats():
        return [t for t in threading.enumerate() if t.name == f"heartbeat of {lock}"]

    with atomic.exclusive_lock(lock, "checkpoint directory x"):
        assert json.loads(open(lock).read())["heartbeat"] == 0.05
        assert len(beats()) == 1 and beats()[0].daemon   # never keeps the interpreter alive
        _ago(lock, 1000)
        time.sleep(0.3)
        assert time.time() - os.stat(lock).st_mtime < 5
        real = os.utime

        def broken(*a, **k):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, "utime", broken)   # a failing touch is ignored: the beat goes on
        time.sleep(0.2)
        monkeypatch.setattr(os, "utime", real)
        assert len(beats()) == 1
    assert beats() == [] and not os.path.exists(lock)


@pytest.mark.parametrize("exc, line", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/nope"),
     "error: /proc/nope: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "error: /root/x: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), "error: /tmp: Is a directory"),
])
def test_run_cli_names_a_path_the_system_refused(capsys, monkeypatch, exc, line):
    """A tool writing into a folder that does not exist (make_tiny_llama --save /proc/nope) or
    reading a directory as a file: the path and the system's reason, no traceback."""
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)

    def main():
        raise exc
    assert run_cli(main) == 1
    assert capsys.readouterr().err.splitlines() == [line]


def test_run_cli_lets_an_os_error_without_a_path_through(monkeypatch):
    monkeypatch.delenv("MEGATRON_VL_DEBUG", raising=False)

    def main():
        raise ConnectionResetError(errno.ECONNRESET, "reset")   # no path of the user's: a bug or the network
    with pytest.raises(ConnectionResetError):
        run_cli(main)


def test_same_path_sees_through_symlinks_and_spellings(tmp_path, monkeypatch):
    """--load and --save through a symlink (a scratch link on a cluster) are one directory to the
    checkpoint rules, as they are to the output guard."""
    from megatron_vl.atomic import same_path
    real = tmp_path / "ckpt"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert same_path(str(tmp_path / "link"), "ckpt") and same_path("./ckpt/", str(real))
    assert not same_path(str(real), str(tmp_path)) and not same_path(None, str(real)) and not same_path("", "")

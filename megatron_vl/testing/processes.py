"""Child processes for the tests and benchmarks: the one way they start a script.

Each child starts in a process group of its own. When its time is up, or the wait for it is
interrupted (pytest-timeout, Ctrl-C), it is ended together with everything it started: its
group, and its descendants that left the group (torchrun starts each worker in a session of
its own). A hung launcher then fails one test in its timeout instead of leaving ranks behind
that hold ports, shared memory and cores for the rest of the suite.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from typing import Mapping, Optional, Sequence

__all__ = ["Finished", "ScriptFailed", "ScriptTimeout", "end_process_tree", "kill_with_descendants", "run_script",
           "start_process"]

TAIL_CHARS = 4000   # how much of a failed script's output an error shows (its end: where the error is)


class ScriptFailed(AssertionError):
    """A script exited with another code than the caller expected."""


class ScriptTimeout(AssertionError):
    """A script did not finish in its time (it and all it started were killed)."""


class Finished(subprocess.CompletedProcess):
    """A finished script: args, returncode, stdout, stderr (None when merged into stdout)."""

    @property
    def output(self) -> str:
        """Everything it printed: stdout, then stderr."""
        return (self.stdout or "") + (self.stderr or "")


def start_process(argv: Sequence, *, cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                  capture: bool = False, merge_stderr: bool = False) -> subprocess.Popen:
    """argv (items made str) started in a new session, so that it and whatever it starts form
    one process group (end_process_tree ends them); env None inherits this process's
    environment, stdin is inherited. capture: stdout and stderr are pipes of text;
    merge_stderr: stderr goes into stdout's pipe. The caller waits for it and reaps it."""
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen([str(a) for a in argv], cwd=cwd, env=None if env is None else dict(env),
                            stdout=pipe, stderr=subprocess.STDOUT if merge_stderr and capture else pipe,
                            text=True, start_new_session=True)


def kill_with_descendants(pid: int) -> None:
    """SIGKILL to process pid and every process under it (those in sessions of their own too);
    waits up to 10 s for the descendants. For a child this process does not reap itself (a
    multiprocessing rank: its Process.join does)."""
    import psutil   # a dependency of deepspeed
    try:
        top = psutil.Process(pid)
        family = top.children(recursive=True) + [top]
    except psutil.NoSuchProcess:
        return
    for member in family:   # psutil checks each is still the process it found (no pid reuse)
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family[:-1], timeout=10)


def end_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to proc, its process group and every descendant (those in sessions of their own
    too). Does not reap proc: the caller's communicate()/wait() does."""
    kill_with_descendants(proc.pid)
    # Not yet reaped (returncode None), proc's pid cannot have been reused, so neither has its
    # group id: this reaches the group's members that were orphaned before the kill.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def describe(argv: Sequence, limit: int = 300) -> str:
    """argv as a shell line, cut to `limit` characters (a training command has ~60 arguments)."""
    line = shlex.join(str(a) for a in argv)
    return line if len(line) <= limit else line[:limit] + " ..."


def _collect_after_kill(proc: subprocess.Popen):
    """(stdout, stderr) of a process ended by end_process_tree; a process started after the
    first kill may still hold the pipes, so kill again rather than wait forever."""
    for _ in range(3):
        end_process_tree(proc)
        try:
            return proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            continue
    return "", "(output not collected: a process it started kept its pipes open)"


def run_script(argv: Sequence, *, timeout: Optional[float] = 300, cwd: Optional[str] = None,
               env: Optional[Mapping[str, str]] = None, expect: Optional[int] = None,
               merge_stderr: bool = False, tail: int = TAIL_CHARS) -> Finished:
    """Runs argv (items made str) to its end in its own process group, its output captured as
    text, stdin inherited; env None inherits this process's environment. merge_stderr: one
    interleaved stream in .stdout (.stderr None). timeout None waits as long as it takes.

    Raises ScriptTimeout (the command and its output's last `tail` characters) when it runs
    past `timeout` seconds, after killing it and all it started; with `expect` set, raises
    ScriptFailed when it exits with another code."""
    argv = [str(a) for a in argv]
    proc = start_process(argv, cwd=cwd, env=env, capture=True, merge_stderr=merge_stderr)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _collect_after_kill(proc)
        raise ScriptTimeout(f"{describe(argv)} did not finish in {timeout:g} s (killed, with all it started); "
                            f"its output ends:\n{((out or '') + (err or ''))[-tail:]}") from None
    except BaseException:   # pytest-timeout's failure, KeyboardInterrupt: the children go too
        end_process_tree(proc)
        proc.wait()
        raise
    done = Finished(argv, proc.returncode, out, err)
    if expect is not None and done.returncode != expect:
        raise ScriptFailed(f"{describe(argv)} exited {done.returncode}, expected {expect}:\n{done.output[-tail:]}")
    return done

"""The checkout's scripts (tools/*.py, the entry scripts) as the tests and benchmarks run them:
loaded by path as modules, or run to their end, in this process or in a real interpreter.

The scripts are not part of the installed package; these helpers find them beside it, so they
need the source checkout the package was installed from (pip install -e .).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import traceback
from types import ModuleType
from typing import List, Optional, Tuple

from .processes import run_script

__all__ = ["CHECKOUT", "load_script", "run_main", "run_tool"]

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The source checkout holding megatron_vl/, tools/ and the entry scripts."""


def script_path(script: str) -> str:
    """script (absolute, or relative to the checkout: "tools/make_sample_data.py") as an absolute path."""
    path = os.path.join(CHECKOUT, script)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such script (megatron_vl.testing runs the scripts of a source "
                                f"checkout; install the package from one with pip install -e .)")
    return path


def load_script(script: str, name: Optional[str] = None) -> ModuleType:
    """The script's module, executed (its `if __name__ == "__main__"` block is not): to call its
    main(argv) or its functions. name: the module's name (default `_script_<file stem>`)."""
    path = script_path(script)
    spec = importlib.util.spec_from_file_location(name or "_script_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script: str, argv: List[str]) -> Tuple[int, str]:
    """The script's main(argv) in this process, as `python script ...` would run it: (exit code,
    everything printed). User errors end in one line (megatron_vl.errors.run_cli), SystemExit
    and a crash's traceback are reported as the interpreter reports them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            path = script_path(script)
            spec = importlib.util.spec_from_file_location("_tool_" + os.path.basename(script)[:-3], path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            from megatron_vl.errors import run_cli   # as `python tools/X.py` runs main: user errors are one line
            code = run_cli(module.main, argv)
        except SystemExit as exc:   # argparse and sys.exit("message"), as the interpreter maps them
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue()


def run_tool(*args, expect: int = 0, process: bool = False) -> str:
    """Runs tools/X.py (args[0], relative to the checkout) with these arguments and checks its
    exit code; returns what it printed. In this process by default (run_main): a process costs
    seconds of imports and the data tests run ~45 tools. process=True runs a real interpreter."""
    if process:
        done = run_script([sys.executable, *args], cwd=CHECKOUT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=CHECKOUT, OMP_NUM_THREADS="1"))
        code, out = done.returncode, done.output
    else:
        code, out = run_main(str(args[0]), [str(a) for a in args[1:]])
    assert code == expect, f"{args} exited {code}, expected {expect}:\n{out}"
    return out

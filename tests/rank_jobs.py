"""Several training jobs in turn in one set of run_distributed processes (one spawn, one set of
imports: seconds each), each job's console output kept: tests/test_reshard.py, tests/test_finetune.py.
Each job builds its model, optimizer and groups anew and reads only its checkpoint, as new
processes would."""

import contextlib
import io
import sys


class Printed(io.StringIO):
    """What a job prints, kept, and still printed (a failing job's log shows)."""

    def write(self, text):
        sys.__stdout__.write(text)
        return super().write(text)


def printing(job):
    """(job(), what it printed to stdout)."""
    printed = Printed()
    with contextlib.redirect_stdout(printed):
        value = job()
    return value, printed.getvalue()

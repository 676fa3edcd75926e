"""The README is what a user sees first: its quickstart step list and every console line it
quotes from the quickstart must be the script's own (examples/quickstart.sh)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


def script_steps():
    """{N: header text} of the script's `step "N. ..."` calls, as a run with the defaults prints them."""
    script = _read("examples/quickstart.sh").replace("\\\n", "")
    steps = {}
    for number, text in re.findall(r'^step "(\d+)\. (.*?)"\s*$', script, re.M):
        text = re.sub(r"\s+", " ", text).replace("$OUT", "quickstart_out").replace("$ITERS", "200")
        steps[int(number)] = text
    return steps


def test_readme_step_list_is_the_scripts():
    readme = _read("README.md")
    block = readme.split("The quickstart prints a `== [time] N. what` line before each step:", 1)[1]
    block = block.split("\n\n", 2)[1]   # the numbered list, up to the next blank line
    listed = [int(n) for n in re.findall(r"(?:^|; )(\d+)\. ", block, re.M)]
    steps = script_steps()
    assert listed == sorted(steps) and len(steps) >= 10, (listed, sorted(steps))


def test_quoted_console_lines_are_the_scripts():
    steps = script_steps()
    quoted = re.findall(r"^== \[\d\d:\d\d:\d\d\] (\d+)\. (.*)$", _read("README.md"), re.M)
    assert quoted, "the README quotes no step line"
    for number, text in quoted:
        assert int(number) in steps and text == steps[int(number)], (number, text, steps.get(int(number)))

"""The benchmarks' shared `--smoke` flag: the same code path at the smallest sizes, so a test
can run every benchmark in seconds (tests/test_benchmarks.py) and none rots unseen."""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence


def add_smoke_flag(p: argparse.ArgumentParser, smoke: Dict) -> None:
    p.add_argument("--smoke", action="store_true",
                   help=f"smoke test: the same code path at the smallest sizes, in seconds ({smoke}; explicit "
                        f"flags still win); the figures mean nothing")


def parse_with_smoke(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], smoke: Dict) -> argparse.Namespace:
    """p's arguments; with --smoke, `smoke` replaces the defaults (flags given still win)."""
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
    return args

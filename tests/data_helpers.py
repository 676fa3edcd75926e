"""Sample corpora and datasets the data tests build themselves."""

import os

from megatron_vl.testing.scripts import run_tool  # noqa: F401  (the tests import it from here)
from megatron_vl.testing.tiny_data import preprocess  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_clip(path):
    from megatron_vl.testing.tiny_models import save_tiny_clip
    return save_tiny_clip(path)

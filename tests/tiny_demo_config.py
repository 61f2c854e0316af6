"""The demo's config shrunk for the test suite: `python -m fgd_jax.demo --config THIS_FILE`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._tiny import tiny_config  # noqa: E402


def get_config(variant: str = "fgd"):
    return tiny_config("unused: the demo sets data.root", variant, steps=3)

"""Config file for CLI tests: `--config tests/tiny_config.py:VARIANT,DATA_ROOT[,TEACHER_CKPT]`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._tiny import tiny_config  # noqa: E402


def get_config(arg: str):
    variant, root, *rest = arg.split(",")
    cfg = tiny_config(root, variant, steps=6)
    if rest:
        cfg.teacher.ckpt = rest[0]
    return cfg

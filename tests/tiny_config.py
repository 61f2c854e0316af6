"""Config file for CLI tests: `--config tests/tiny_config.py:VARIANT,DATA_ROOT[,TEACHER_CKPT]`.

VARIANT: 'baseline' or 'fgd' (6 steps); with '+stable' ('baseline+stable') the settings of
the tests that compare two runs (`_tiny.STABLE`, `_tiny.STABLE_STEPS` steps).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._tiny import STABLE, STABLE_STEPS, tiny_config  # noqa: E402


def get_config(arg: str):
    variant, root, *rest = arg.split(",")
    variant, _, regime = variant.partition("+")
    if regime not in ("", "stable"):
        raise ValueError(f"unknown regime {regime!r} in {arg!r} (only '+stable')")
    if regime == "stable":
        cfg = tiny_config(root, variant, steps=STABLE_STEPS, **STABLE)
    else:
        cfg = tiny_config(root, variant, steps=6)
    if rest:
        cfg.teacher.ckpt = rest[0]
    return cfg

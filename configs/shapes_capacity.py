"""Does a bigger detector beat a smaller one on the synthetic set? RetinaNet R10 / R18 / R34.

Run:    python -m fgd_jax.train --config configs/shapes_capacity.py:DEPTH --workdir W
        (DEPTH 10, 18 or 34; --config.seed=1 for a second seed)
Should reach (2-core CPU VM, one core per run, 8 / 15 / 25 min; 512 val images), after 2400
steps, seeds 0 / 1 / 2: R10 49.8 / 54.4 / 52.4, R18 56.9 / 59.7 / 60.0, R34 60.1 / 60.7 AP
(benchmarks/results/shapes_capacity_cpu.md).

The demo's data and models (configs/shapes_demo.py: the `lookalike` variant with shapes of 32
px and up; 64-channel FPN and heads, from scratch, AdamW), trained to near convergence: 4096
images, 2400 steps of batch 8, one decay at 80%. Only the backbone depth differs.
"""

import os

from fgd_jax import config as C

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_demo.py")


def get_config(arg: str | None = None) -> C.ConfigDict:
    """`arg`: the backbone depth, 10, 18 (default) or 34 (same stage widths, so the same
    neck and heads)."""
    depth = int(arg or 18)
    if depth not in (10, 18, 34):
        raise ValueError(f"shapes_capacity.py:{arg}: expected depth 10, 18 or 34")
    cfg = C.load_config(f"{DEMO}:baseline")
    cfg.data.root = ".cache/shapes96_lookalike_4096"
    cfg.data.num_train = 4096
    cfg.data.num_val = 512
    cfg.model.backbone.depth = depth
    cfg.train.num_steps = 2400
    cfg.train.decay_steps = (1920,)
    cfg.train.ckpt_every = 400
    cfg.train.eval_every = 800
    return cfg

"""Data parallelism: two FGD train steps of the tiny RetinaNet on 8 (forced CPU) devices
equal the same steps on 1 device with the same global batch (reference: the 1-device run).

The run trains in the stable regime of `_tiny.STABLE` (asserted), and params, BN statistics and
every step's losses are compared with `_compare.tree_difference` (each leaf relative to
max(its max, the tree's rms)), tolerance 1e-4: float32, different reduction orders. Measured
on a 2-core AMD EPYC (AVX2): params 1.1e-7 (2.3e-5 with XLA_FLAGS=--xla_cpu_max_isa=SSE4_2, on
the student's conv1 kernel), BN statistics 6e-7, losses 6e-7."""

import json
import os
import subprocess
import sys

import pytest

from ._compare import assert_stable
from ._tiny import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_8_devices_equal_1_device(tmp_path):
    env = cpu_env(devices=8)
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "_sharded_step.py"), str(tmp_path / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out["devices"] == 8
    assert_stable(out["grad_norm"], out["loss"])
    for what in ("params", "batch_stats", "losses"):  # BN statistics over the global batch
        worst, where = out[what]
        assert worst <= 1e-4, (what, worst, where)

"""Data parallelism: two FGD train steps of the tiny RetinaNet on 8 (forced CPU) devices equal
the same steps on 1 device with the same global batch (reference: the 1-device run)."""

import json
import os
import subprocess
import sys

import pytest

from ._tiny import REPO

pytestmark = pytest.mark.slow


def test_8_devices_equal_1_device(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
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
    assert out["devices"] == 8
    # fp32, different reduction orders: equal to ~1e-5 relative
    assert out["params"] < 1e-4, out
    assert out["batch_stats"] < 1e-4, out  # BN statistics over the global batch (SyncBN)
    assert max(out["losses"].values()) < 1e-4, out

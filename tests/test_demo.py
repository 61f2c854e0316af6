"""The newcomer's first run (`python -m fgd_jax.demo`) end to end at a reduced size."""

import json
import os
import subprocess
import sys

import pytest

from ._tiny import REPO

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "fgd_jax.demo",
        "--workdir",
        str(work),
        "--data-root",
        str(tmp_path / "data"),
        "--config",
        os.path.join(REPO, "tests", "tiny_demo_config.py"),
        "--steps",
        "3",
        "--teacher-steps",
        "4",
    ]  # the ablation row (inheriting only) is on by default
    r = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    rows = {"teacher (R18)", "student (R18)", "student (R18) + FGD"}
    rows.add("student (R18) + inheriting only")
    for row in (*rows, "AP50", "FGD changed", "inheriting alone"):
        assert row in out, out[-2000:]
    results = json.loads((work / "results.json").read_text())
    assert set(results) == rows
    assert all(0.0 <= m["AP"] <= 1.0 for m in results.values())
    # the teacher is cached: a second run reuses it
    assert (work / "teacher" / "export" / "variables").is_dir()

"""The newcomer's first run (`python -m fgd_jax.demo`) end to end at a reduced size."""

import json
import os
import subprocess
import sys

import pytest

from ._tiny import REPO

pytestmark = pytest.mark.slow


def _run(cmd: list[str]) -> str:
    r = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


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
    out = _run(cmd)
    rows = {"teacher (R18)", "student (R18)", "student (R18) + FGD"}
    rows.add("student (R18) + inheriting only")
    for row in (*rows, "AP50", "FGD changed", "inheriting alone"):
        assert row in out, out[-2000:]
    results = json.loads((work / "results.json").read_text())
    assert set(results) == rows
    assert all(0.0 <= m["AP"] <= 1.0 for m in results.values())
    # the teacher is cached with what it was trained on: a second run with the same
    # settings reuses it (other settings change the key: the test below)
    assert (work / "teacher" / "export" / "variables").is_dir()
    assert "reusing the teacher" not in out
    assert "reusing the teacher" in _run([*cmd, "--no-ablation"])
    rerun = json.loads((work / "results.json").read_text())
    assert rerun["teacher (R18)"]["AP"] == results["teacher (R18)"]["AP"]


def test_demo_teacher_key_tracks_what_the_teacher_was_trained_with():
    from fgd_jax.config import load_config
    from fgd_jax.demo import _teacher_key

    cfg = load_config(os.path.join(REPO, "configs", "shapes_demo.py") + ":teacher")
    key = _teacher_key(cfg)
    json.dumps(key)  # stored as json
    for path, value in (
        ("data.num_train", 7),
        ("data.image_size", 64),
        ("model.backbone.depth", 18),
        ("train.num_steps", 3),
        ("seed", 5),
    ):
        other = cfg.copy_and_resolve_references()
        node = other
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        assert _teacher_key(other) != key, path
    assert _teacher_key(cfg.copy_and_resolve_references()) == key

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
    # settings reuses it and finds the students' runs complete (other settings change the
    # key: the test below)
    assert (work / "teacher" / "export" / "variables").is_dir()
    assert "reusing the teacher" not in out
    again = _run([*cmd, "--no-ablation"])
    assert "reusing the teacher" in again and "starting it over" not in again
    assert again.count("resumed from step 3") == 2  # baseline and FGD: nothing left to train
    rerun = json.loads((work / "results.json").read_text())
    assert rerun["teacher (R18)"]["AP"] == results["teacher (R18)"]["AP"]


def test_demo_run_key_tracks_what_a_run_was_made_with(tmp_path):
    from fgd_jax.config import load_config
    from fgd_jax.demo_runs import KEY_FILE, prepare_workdir, run_key

    cfg = load_config(os.path.join(REPO, "configs", "shapes_demo.py") + ":teacher")
    key = run_key(cfg)
    json.dumps(key)  # stored as json
    for path, value in (
        ("data.num_train", 7),
        ("data.image_size", 64),
        ("data.shapes_variant", "basic"),
        ("model.backbone.depth", 34),
        ("train.num_steps", 3),
        ("seed", 5),
    ):
        other = cfg.copy_and_resolve_references()
        node = other
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        assert run_key(other) != key, path
    assert run_key(cfg.copy_and_resolve_references()) == key
    # a workdir made with the same key is kept (an interrupted run resumes from its
    # checkpoints), one made with another key or without a key is emptied
    run = tmp_path / "run"
    prepare_workdir(str(run), key)
    (run / "checkpoints").mkdir()
    prepare_workdir(str(run), key)
    assert (run / "checkpoints").is_dir()
    prepare_workdir(str(run), run_key(other))
    assert not (run / "checkpoints").exists()
    assert json.loads((run / KEY_FILE).read_text()) == json.loads(json.dumps(run_key(other)))
    (run / KEY_FILE).unlink()
    (run / "checkpoints").mkdir()
    prepare_workdir(str(run), key)
    assert not (run / "checkpoints").exists()


def test_capacity_configs_differ_only_in_backbone_depth():
    # configs/shapes_capacity.py: the study behind "a bigger model beats a smaller one"; the
    # runs train the demo's models the same way on the demo's data, only the depth differs.
    from fgd_jax.config import load_config

    path = os.path.join(REPO, "configs", "shapes_capacity.py")
    demo = json.loads(load_config(os.path.join(REPO, "configs", "shapes_demo.py")).to_json())
    runs = {d: json.loads(load_config(f"{path}:{d}").to_json()) for d in (10, 18, 34)}
    for depth, cfg in runs.items():
        assert cfg["data"]["shapes_variant"] == demo["data"]["shapes_variant"] == "lookalike"
        assert cfg["data"]["shapes_min_size"] == demo["data"]["shapes_min_size"] == 32
        assert cfg["model"]["num_classes"] == cfg["data"]["num_classes"] == 10
        assert cfg["data"]["num_train"] == 4096 and cfg["train"]["num_steps"] == 2400
        assert cfg["model"]["backbone"].pop("depth") == depth
    assert runs[10] == runs[18] == runs[34]
    # the demo's teacher and student are two of them
    assert (demo["teacher"]["model"]["backbone"]["depth"], demo["model"]["backbone"]["depth"]) == (
        18,
        10,
    )
    with pytest.raises(ValueError, match="depth 10, 18 or 34"):
        load_config(f"{path}:50")

"""End-to-end training on the synthetic dataset with a tiny RetinaNet (R18, 32 channels).

References: the uninterrupted run (resume), the rules of the NaN guard, and the loss curves.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fgd_jax.export import load_model
from fgd_jax.logging_utils import read_metrics
from fgd_jax.train import train

from ._tiny import REPO, make_teacher, tiny_config

pytestmark = pytest.mark.slow


def test_every_loss_part_decreases(fgd_run):
    _, workdir, metrics = fgd_run
    recs = [r for r in read_metrics(workdir) if "loss" in r]
    assert len(recs) == 40
    keys = [k for k in recs[0] if k.startswith("loss")]
    assert (
        "loss_cls" in keys and "loss_fgd_fpn_0/relation" in keys and "loss_fgd_fpn_4/mask" in keys
    )
    first = {k: np.mean([r[k] for r in recs[:3]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-3:]]) for k in keys}
    # bg of the coarsest levels can be exactly zero when boxes cover every cell
    grew = [k for k in keys if last[k] > first[k] and first[k] > 1e-6]
    assert not grew, {k: (first[k], last[k]) for k in grew}
    for k in ("lr", "grad_norm", "images_per_s", "step_time_s", "host_rss_mib"):
        assert k in recs[-1]
    assert 0.0 <= metrics["AP"] <= 1.0
    assert os.path.isfile(os.path.join(workdir, "eval", "metrics.json"))


def test_teacher_unchanged_and_student_exported(fgd_run, tmp_path):
    cfg, workdir, _ = fgd_run
    from fgd_jax import checkpoint as ckpt_lib

    before, _ = ckpt_lib.load_variables(cfg.teacher.ckpt)
    teacher, tcfg = load_model(workdir, teacher=True)
    jax.tree.map(np.testing.assert_array_equal, before, teacher)  # bit-identical
    assert "teacher" not in tcfg and tcfg.model.backbone.depth == cfg.teacher.model.backbone.depth
    student, scfg = load_model(workdir)
    assert "distill_losses" not in student["params"] and "teacher" not in scfg


def test_nan_guard_names_the_loss(tmp_path):
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=4)
    make_teacher(cfg, str(tmp_path / "teacher"))
    cfg.distill.alpha_fgd = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"loss_fgd_fpn_\d=nan.*step 1|step 1.*loss_fgd_fpn"
    ):
        train(cfg, str(tmp_path / "work"))
    # no checkpoint of a NaN state was written
    ck = tmp_path / "work" / "checkpoints"
    assert not ck.exists() or not [p for p in os.listdir(ck) if p.isdigit()]


def _cli(workdir, arg, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "fgd_jax.train",
        f"--config=tests/tiny_config.py:{arg}",
        f"--workdir={workdir}",
        "--config.train.ckpt_every=2",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if wait:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    data = str(tmp_path / "data")
    arg = f"baseline,{data}"
    _cli(str(tmp_path / "full"), arg)
    proc = _cli(str(tmp_path / "killed"), arg, wait=False)
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckdir.exists() and any(p.isdigit() and int(p) >= 2 for p in os.listdir(ckdir)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _cli(str(tmp_path / "killed"), arg)
    assert "resumed from step" in r.stdout
    a, _ = load_model(str(tmp_path / "full"))
    b, _ = load_model(str(tmp_path / "killed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with (
        open(tmp_path / "full" / "eval" / "metrics.json") as f1,
        open(tmp_path / "killed" / "eval" / "metrics.json") as f2,
    ):
        assert json.load(f1)["AP"] == json.load(f2)["AP"]

"""End-to-end training on the synthetic dataset with a tiny RetinaNet (R18, 32 channels).

References: the uninterrupted run (resume), the rules of the NaN guard, and the loss curves.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fgd_jax.experiment import load_model
from fgd_jax.logging_utils import read_metrics
from fgd_jax.trainer import train

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
    from fgd_jax.analysis import load_train_state

    from .conftest import tree_digest

    cfg, workdir, _ = fgd_run
    # the teacher's checkpoint files are byte-identical to before training, and the train
    # state holds no teacher leaf the optimizer could have moved
    before = (Path(cfg.teacher.ckpt).parent / "teacher.sha256").read_text()
    assert tree_digest(cfg.teacher.ckpt) == before
    params, model_state, _, _ = load_train_state(workdir)
    assert set(params) == {"student", "distill_losses"} and "teacher" not in model_state
    teacher, tcfg = load_model(workdir, teacher=True)
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


def test_model_with_fewer_classes_than_the_data_is_refused(tmp_path):
    # labels beyond the model's outputs would train as background (one-hot of an
    # out-of-range label is all zeros): refused before any step, naming the json
    cfg = tiny_config(str(tmp_path / "data"), steps=2)
    cfg.model.num_classes = 10
    with pytest.raises(
        ValueError, match=r"instances_train.json: 6 categories .* model.num_classes=10"
    ):
        train(cfg, str(tmp_path / "work"))
    assert not (tmp_path / "work" / "checkpoints").exists() or not os.listdir(
        tmp_path / "work" / "checkpoints"
    )


def _cli(workdir, arg, *extra, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "fgd_jax.train",
        f"--config=tests/tiny_config.py:{arg}",
        f"--workdir={workdir}",
        "--config.train.ckpt_every=2",
        *extra,
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
    resumed = int(re.search(r"resumed from step (\d+)", r.stdout).group(1))
    assert 2 <= resumed < 6, resumed  # killed mid-run, not after the final save
    a, _ = load_model(str(tmp_path / "full"))
    b, _ = load_model(str(tmp_path / "killed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with (
        open(tmp_path / "full" / "eval" / "metrics.json") as f1,
        open(tmp_path / "killed" / "eval" / "metrics.json") as f2,
    ):
        assert json.load(f1)["AP"] == json.load(f2)["AP"]


def test_nan_later_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN image at step 3 (after the checkpoint of step 2): the error names step 3 and
    the loss, and checkpoint 2 is complete, finite and restorable."""
    from fgd_jax import checkpoint as ckpt_lib
    from fgd_jax.analysis import load_train_state
    from fgd_jax.data import pipeline

    cfg = tiny_config(str(tmp_path / "data"), "baseline", steps=6)
    build = pipeline.build_train_loader

    def poisoned(*args, **kwargs):
        loader = build(*args, **kwargs)
        real_next, count = loader.__next__, [0]

        class Wrapped:
            def __getattr__(self, name):
                return getattr(loader, name)

            def __next__(self):
                batch = real_next()
                count[0] += 1
                if count[0] == 3:
                    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
                return batch

        return Wrapped()

    monkeypatch.setattr(pipeline, "build_train_loader", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 3: .*loss"):
        train(cfg, str(tmp_path / "work"))
    mngr = ckpt_lib.CheckpointManager(str(tmp_path / "work" / "checkpoints"))
    assert mngr.latest_step() == 2
    mngr.close()
    params, _, _, step = load_train_state(str(tmp_path / "work"))
    assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_inf_gradient_norm_stops_training():
    """Finite losses but an inf gradient norm (clipping would then write NaN params)."""
    from fgd_jax.trainer import check_finite_metrics

    check_finite_metrics(
        1, {"loss": np.float32(1.0), "grad_norm": np.float32(3.0), "lr": np.float32(0.1)}
    )
    with pytest.raises(FloatingPointError, match=r"step 7: grad_norm=inf"):
        check_finite_metrics(7, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})


def test_sigusr1_saves_a_checkpoint_and_stops_then_resumes(tmp_path):
    """SLURM's `--signal=USR1@T` before the time limit: the run saves at its next log step,
    exits 0 saying so, and the same command resumes to the end."""
    data = str(tmp_path / "data")
    arg = f"baseline,{data}"
    work = tmp_path / "work"
    metrics = work / "metrics.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fgd_jax.train", f"--config=tests/tiny_config.py:{arg}",
            f"--workdir={work}", "--config.train.ckpt_every=100",
            "--config.train.num_steps=40",  # room to be signalled before the end
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break  # step 1 is done: the signal handler is installed
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 1 <= stopped < 40 and "run the same command to resume" in out
    assert (work / "checkpoints" / str(stopped)).is_dir()
    r = _cli(str(work), arg, "--config.train.num_steps=40")
    assert f"resumed from step {stopped}" in r.stdout
    steps = [rec["step"] for rec in read_metrics(work) if "loss" in rec]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # each step logged once


def test_backbone_init_loads_imagenet_weights_into_the_student(tmp_path):
    """`train.backbone_init`: a torchvision ResNet-18 .pth (classification layout) becomes the
    student's backbone (reference: the torch tensors); inheriting still copies the teacher's
    neck and heads, never its backbone."""
    import torch
    import torchvision

    from fgd_jax.experiment import Experiment, dummy_batch, init_train_state

    torch.manual_seed(0)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    cfg = tiny_config(str(tmp_path / "data"), "fgd")
    tvars = make_teacher(cfg, str(tmp_path / "teacher"))
    cfg.train.backbone_init = str(tmp_path / "r18.pth")
    state, _, _ = init_train_state(Experiment(cfg), dummy_batch(cfg.data), 4, tvars)
    bb = state.params["student"]["backbone"]
    np.testing.assert_array_equal(
        bb["layer3_1"]["conv2"]["kernel"], sd["layer3.1.conv2.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        state.model_state["batch_stats"]["student"]["backbone"]["layer1_0"]["bn1"]["mean"],
        sd["layer1.0.bn1.running_mean"].numpy(),
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        state.params["student"]["neck"],
        tvars["params"]["neck"],
    )
    cfg.train.backbone_init = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        init_train_state(Experiment(cfg), dummy_batch(cfg.data), 4, tvars)
    cfg.train.from_scratch = True  # a from-scratch recipe (YOLOX) names no ImageNet weights
    with pytest.raises(ValueError, match="from_scratch=True .* contradicts train.backbone_init"):
        init_train_state(Experiment(cfg), dummy_batch(cfg.data), 4, tvars)

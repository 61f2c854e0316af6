"""eval / export / convert commands on a tiny trained run (see conftest.fgd_run).

References: pycocotools run directly on our detections file; the training checkpoint's own
student outputs; our converter's import of the exported PyTorch state dict.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import experiment
from fgd_jax import export as export_lib
from fgd_jax.convert import import_torch_checkpoint, load_torch_file
from fgd_jax.eval import main as eval_main
from fgd_jax.evaluation import val_annotation_file
from fgd_jax.models import build_detector

from ._tiny import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_eval_cli_equals_pycocotools_on_its_detections(fgd_run, tmp_path, capsys):
    cfg, workdir, _ = fgd_run
    out = tmp_path / "eval"
    assert eval_main(["--ckpt", workdir, "--out", str(out)]) == 0
    ours = json.loads((out / "metrics.json").read_text())
    dets = json.loads((out / "detections.json").read_text())
    gt = COCO(val_annotation_file(cfg.data))
    if dets:
        ev = COCOeval(gt, gt.loadRes(str(out / "detections.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        ref = np.maximum(ev.stats[:3], 0)
    else:
        ref = np.zeros(3)
    np.testing.assert_allclose([ours["AP"], ours["AP50"], ours["AP75"]], ref, atol=1e-12)
    # every val image was evaluated once; padding examples never appear
    assert {d["image_id"] for d in dets} <= set(gt.getImgIds())
    printed = capsys.readouterr().out
    assert "wrote" in printed and "per-class AP" in printed
    # how often the static cap on detections per image was reached, counted on the real images
    cap = ours["detections_cap"]
    per_image = np.bincount([d["image_id"] for d in dets], minlength=max(gt.getImgIds()) + 1)
    assert ours["images_at_detection_cap"] == int((per_image == cap).sum())
    assert f"reached in {ours['images_at_detection_cap']} images" in printed
    for name, ap in ours["per_class_AP"].items():  # every class printed with its AP
        assert f"  {name}" in printed and f"{100 * ap:5.1f}" in printed


def test_export_reproduces_the_student_and_round_trips_through_torch(fgd_run, tmp_path):
    cfg, workdir, _ = fgd_run
    out, pth = tmp_path / "student", tmp_path / "student.pth"
    assert export_lib.main(["--ckpt", workdir, "--out", str(out), "--torch", str(pth)]) == 0
    trained, _ = experiment.load_model(workdir)
    exported, ecfg = ckpt_lib.load_variables(str(out))
    assert "teacher" not in ecfg and "distill" not in ecfg
    jax.tree.map(np.testing.assert_array_equal, trained, exported)
    # same detections from the exported model as from the training checkpoint's student
    det = build_detector(ecfg.model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    shp, sf = jnp.array([[64, 64]]), jnp.ones((1, 4))
    a = det.apply(trained, x, shp, sf, method="predict")
    b = det.apply(exported, x, shp, sf, method="predict")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # PyTorch state dict (mmdetection names) re-imports to identical params
    sd = load_torch_file(str(pth))
    assert any(k.startswith("bbox_head.retina_cls") for k in sd)
    back = import_torch_checkpoint(str(pth), ecfg.model)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, exported), back)


def _run(args):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_bad_inputs_give_one_line_errors(fgd_run, tmp_path):
    cfg, workdir, _ = fgd_run
    r = _run(["-m", "fgd_jax.eval", "--ckpt", str(tmp_path / "nope")])
    assert r.returncode == 1 and "nope" in r.stderr and "Traceback" not in r.stderr
    # a checkpoint of another architecture given as a teacher
    other = tmp_path / "other"
    ckpt_lib.save_variables(str(other), {"params": {"x": np.zeros(3)}}, cfg)
    with pytest.raises(ValueError, match="does not match the expected model"):
        from fgd_jax.experiment import Experiment, load_teacher

        c = cfg.copy_and_resolve_references()
        c.teacher.ckpt = str(other)
        load_teacher(Experiment(c))
    r = _run(["-m", "fgd_jax.export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_eval_refuses_a_config_that_does_not_match_the_checkpoint(fgd_run, tmp_path):
    cfg, workdir, _ = fgd_run
    # wrong shapes: a one-line error naming the leaf, no traceback wall
    r = _run(["-m", "fgd_jax.eval", "--ckpt", workdir, "--config.model.num_classes=3"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "does not match the model" in r.stderr and "retina_cls" in r.stderr
    # a missing val annotation file is reported before any inference runs
    r = _run(
        [
            "-m", "fgd_jax.eval", "--ckpt", workdir,
            "--config.data.source=coco", f"--config.data.root={tmp_path}",
        ]
    )  # fmt: skip
    assert r.returncode == 1 and "val annotation file not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_check_variables_refuses_a_smaller_model_than_the_checkpoint():
    # Flax ignores extra leaves in apply: a 1-conv head run on a 2-conv head's checkpoint
    # would evaluate silently; check_variables names the extra leaves instead.
    from tests._tiny import tiny_config

    small = tiny_config("/unused").model
    big = small.copy_and_resolve_references()
    big.head.stacked_convs = 2
    x = jnp.zeros((1, 64, 64, 3))
    v_big = build_detector(big).init(jax.random.key(0), x)
    experiment.check_variables(build_detector(big), v_big, "big")  # exact fit passes
    with pytest.raises(ValueError, match=r"unexpected in checkpoint: params/.*1"):
        experiment.check_variables(build_detector(small), v_big, "big")
    v_small = build_detector(small).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="missing in checkpoint"):
        experiment.check_variables(build_detector(big), v_small, "small")


def test_eval_refuses_a_model_with_other_classes_than_the_val_json(tmp_path):
    from fgd_jax.evaluation import predict_dataset
    from tests._tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "data"))
    cfg.model.num_classes = 12
    module = build_detector(cfg.model)
    with pytest.raises(ValueError, match=r"instances_val.json: 6 categories .*num_classes=12"):
        predict_dataset(module, {}, cfg, progress=False)


def test_two_line_load_after_import_fgd_jax():
    import fgd_jax

    assert callable(fgd_jax.experiment.load_model) and callable(fgd_jax.models.build_detector)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fgd_jax.nope  # noqa: B018


def test_eval_on_8_devices_equals_1_device(fgd_run, tmp_path):
    """Data-parallel eval (8 CPU devices, batch 16 for 8 val images: half padding): the same
    detections and metrics as on 1 device (reference: the 1-device run)."""
    _, workdir, _ = fgd_run
    outs = {}
    for n in (1, 8):
        out = tmp_path / f"eval{n}"
        env = cpu_env(devices=n, FGD_JAX_COMPILATION_CACHE="")
        r = subprocess.run(
            [
                sys.executable, "-m", "fgd_jax.eval", "--ckpt", workdir, "--out", str(out),
                "--config.eval.batch_size=16",
            ],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = out
    m1 = json.loads((outs[1] / "metrics.json").read_text())
    m8 = json.loads((outs[8] / "metrics.json").read_text())
    d1 = json.loads((outs[1] / "detections.json").read_text())
    d8 = json.loads((outs[8] / "detections.json").read_text())
    key = lambda d: (d["image_id"], -d["score"], d["bbox"])  # noqa: E731
    assert len(d1) == len(d8)
    for a, b in zip(sorted(d1, key=key), sorted(d8, key=key), strict=True):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=2e-3)
        np.testing.assert_allclose(a["score"], b["score"], atol=2e-5)
    for k in ("AP", "AP50", "AP75"):
        np.testing.assert_allclose(m8[k], m1[k], atol=1e-4, err_msg=k)

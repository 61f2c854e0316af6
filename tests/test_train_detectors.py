"""Faster R-CNN trains under FGD on the synthetic dataset (tiny models): every loss part
decreases (reference: the run's own first steps), through the real trainer. (FCOS: the
stricter `test_fcos.py::test_fgd_student_variant_trains_with_sgd_and_every_loss_part_falls`,
the FGD student variant with SGD.)"""

import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.data import SHAPES_CLASS_NAMES
from fgd_jax.logging_utils import read_metrics
from fgd_jax.trainer import train

from ._tiny import make_teacher, tiny_config

pytestmark = pytest.mark.slow


def _tiny_model():
    """Teacher and student share this architecture (different random init): the mechanics
    under test are the trainer, FGD on each level and inheriting, not the capacity gap."""
    m = C.faster_rcnn_model(
        depth=18,
        num_classes=len(SHAPES_CLASS_NAMES),
        fpn_channels=32,
        rpn_feat_channels=32,
        fc_out_channels=64,
        frozen_stages=-1,
        rpn_num=64,
        rcnn_num=64,
    )
    m.train_cfg.rpn_proposal.nms_pre = 200
    m.train_cfg.rpn_proposal.max_per_img = 100
    m.test_cfg.rpn.nms_pre = 200
    m.test_cfg.rpn.max_per_img = 100
    m.backbone.norm_eval = False
    return m


def test_fgd_training_decreases_every_loss_part(tmp_path):
    levels = 4
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=40)
    cfg.model = _tiny_model()
    cfg.teacher.model = _tiny_model()
    cfg.distill.num_levels = levels
    cfg.train.ckpt_every = 100
    make_teacher(cfg, str(tmp_path / "teacher"))
    metrics = train(cfg, str(tmp_path / "work"))
    recs = [r for r in read_metrics(str(tmp_path / "work")) if "loss" in r]
    keys = [k for k in recs[0] if k.startswith("loss")]
    assert f"loss_fgd_fpn_{levels - 1}" in keys and f"loss_fgd_fpn_{levels}" not in keys
    first = {k: np.mean([r[k] for r in recs[:4]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-4:]]) for k in keys}
    # Faster R-CNN's RoI box loss is not expected to fall in 40 steps from scratch: early on
    # the proposals are random and the positive RoIs are mostly the GT boxes added as
    # proposals (zero regression targets, so a small loss); as the RPN learns, real
    # proposals with non-zero targets become positive and the loss rises (measured here:
    # 0.26 at step 1, 0.40 -> 0.41 first vs last 4 steps). That the RoI head does learn its
    # boxes is checked by test_faster_rcnn.py::test_overfits_one_small_batch (every loss < 0.6x).
    exempt = {"loss_bbox"}
    grew = [k for k in keys if last[k] > first[k] and first[k] > 1e-6 and k not in exempt]
    assert not grew, {k: (first[k], last[k]) for k in grew}
    assert all(np.isfinite(r[k]) for r in recs for k in keys)
    assert 0.0 <= metrics["AP"] <= 1.0

"""FCOS and Faster R-CNN train under FGD on the synthetic dataset (tiny models): every loss
part decreases (reference: the run's own first steps), through the real trainer."""

import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.logging_utils import read_metrics
from fgd_jax.train import train

from ._tiny import make_teacher, tiny_config

pytestmark = pytest.mark.slow


def _tiny_model(kind: str):
    """Teacher and student share this architecture (different random init): the mechanics
    under test are the trainer, FGD on each level and inheriting, not the capacity gap."""
    if kind == "fcos":
        m = C.fcos_model(
            depth=18,
            num_classes=6,
            tricks=False,
            feat_channels=32,
            stacked_convs=1,
            fpn_channels=32,
            num_groups=8,
            frozen_stages=-1,
            style="caffe",
        )
    else:
        m = C.faster_rcnn_model(
            depth=18,
            num_classes=6,
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


@pytest.mark.parametrize("kind,levels", [("fcos", 5), ("faster_rcnn", 4)])
def test_fgd_training_decreases_every_loss_part(tmp_path, kind, levels):
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=40)
    cfg.model = _tiny_model(kind)
    cfg.teacher.model = _tiny_model(kind)
    cfg.distill.num_levels = levels
    if kind == "fcos":
        cfg.data.pixel_style = "caffe"
        # From scratch on un-normalized caffe inputs, SGD at the tiny config's lr does not move
        # FCOS's box loss within 40 steps; AdamW does (as the FCOS overfit test uses Adam).
        cfg.train.optimizer = "adamw"
        cfg.train.base_lr = 1e-3
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
    exempt = {"loss_bbox"} if kind == "faster_rcnn" else set()
    grew = [k for k in keys if last[k] > first[k] and first[k] > 1e-6 and k not in exempt]
    assert not grew, {k: (first[k], last[k]) for k in grew}
    assert all(np.isfinite(r[k]) for r in recs for k in keys)
    assert 0.0 <= metrics["AP"] <= 1.0

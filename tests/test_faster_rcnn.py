"""Faster R-CNN (fgd_jax.models.faster_rcnn) against independent references.

References and tolerances:
- full model: torchvision `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` with
  random weights, randomized BN statistics, eval mode, converted with `fgd_jax.convert` +
  `torchvision_faster_rcnn.prepare_state_dict`. Configured to agree with mmdetection where
  torchvision differs: its rounded integer base anchors are replaced by mmdetection's, its
  RoI pooler (aligned=False, sampling_ratio=2, level `4 + log2(sqrt(wh)/224)`) is replaced by
  a torch transcription of mmdetection's `SingleRoIExtractor` on `torchvision.ops.roi_align`
  (aligned=True, sampling_ratio=0, level `log2(sqrt(wh)/56 + 1e-6)`), and our
  `min_bbox_size` is set to torchvision's 1e-3 proposal size filter. torchvision's RPN does
  per-level top-k then one NMS over levels with the level as the class: mmdetection 2.11's
  order too.
  * FPN maps and RPN outputs per level: max abs error / max |ref| < 1e-4.
  * proposals: the same set (matched box to box within 1e-3 px, scores within 1e-5).
  * RoI features per level: vs `torchvision.ops.roi_align` per level, rel. error < 1e-4.
  * detections: torchvision `RoIHeads` (softmax, (10,10,5,5)-weighted decode == stds
    (0.1,0.1,0.2,0.2), score > 0.05, class-wise NMS 0.5, top 100) on its proposals: the same
    detections (box within 1e-3 px, score within 1e-5) except near the 100th score, where
    float ties may swap (torchvision also drops boxes < 1e-2 px, absent here).
- sampling: exact mmdetection RandomSampler counts recomputed in numpy from the assignment,
  positives first, padding never sampled, reproducible per key; RoI regression targets vs
  torchvision `BoxCoder(weights=(10, 10, 5, 5))` (== mmdetection stds), rel. 1e-5.
- losses: a torch transcription of mmdetection 2.11 `AnchorHead.loss` / `BBoxHead.loss`
  (`F.binary_cross_entropy_with_logits`, `F.cross_entropy`, L1) on the same sampled entries.
- training: a tiny Faster R-CNN (ResNet-18) overfits one batch, every loss part decreasing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList

from fgd_jax import config as C
from fgd_jax.convert import import_torch_checkpoint
from fgd_jax.models import build_detector, init_module
from fgd_jax.models.faster_rcnn import (
    FasterRCNN,
    extract_roi_feats,
    rcnn_loss,
    rcnn_targets,
    rpn_anchors,
    rpn_batch_targets,
    rpn_loss,
    rpn_targets,
)
from fgd_jax.ops import assign as assign_ops

from ._tiny import overfit_batch


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------- references
class MmdetRoIPool(torch.nn.Module):
    """mmdetection 2.11 `SingleRoIExtractor` (RoIAlign 7x7, aligned, sampling_ratio 0,
    finest_scale 56) with torchvision's `MultiScaleRoIAlign` call signature."""

    def __init__(self, strides=(4, 8, 16, 32), out=7, finest_scale=56.0):
        super().__init__()
        self.strides, self.out, self.finest_scale = strides, out, finest_scale

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        lvl = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvl.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features, proposals, image_shapes=None):
        feats = list(features.values())[: len(self.strides)]
        rois = torch.cat(
            [torch.cat([torch.full((len(p), 1), float(i)), p], 1) for i, p in enumerate(proposals)]
        )
        lvl = self.levels(rois[:, 1:])
        out = rois.new_zeros(len(rois), feats[0].shape[1], self.out, self.out)
        for i, s in enumerate(self.strides):
            sel = lvl == i
            if sel.any():
                out[sel] = torchvision.ops.roi_align(
                    feats[i], rois[sel], self.out, 1.0 / s, sampling_ratio=0, aligned=True
                )
        return out


def _tv_randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        # spread the RPN scores and deltas, and the class scores, so that top-k / NMS /
        # thresholds have real work to do
        rpn = model.rpn.head
        rpn.cls_logits.weight.normal_(0, 0.05, generator=g)
        rpn.bbox_pred.weight.normal_(0, 0.01, generator=g)
        pred = model.roi_heads.box_predictor
        pred.cls_score.weight.normal_(0, 0.05, generator=g)
        pred.bbox_pred.weight.normal_(0, 0.01, generator=g)


def match_sets(ours_boxes, ours_scores, ref_boxes, ref_scores, box_tol, score_tol):
    """Each ref entry has an entry of ours with the same box (L-inf < box_tol) and score."""
    d = np.abs(ref_boxes[:, None, :] - ours_boxes[None, :, :]).max(-1)
    j = d.argmin(1)
    assert np.all(d[np.arange(len(j)), j] < box_tol), np.max(d.min(1))
    assert np.all(np.abs(ours_scores[j] - ref_scores) < score_tol)
    assert len(np.unique(j)) == len(j)


@pytest.mark.slow
def test_matches_torchvision_faster_rcnn():
    torch.manual_seed(0)
    num_classes = 3  # foreground; torchvision counts the background too
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1
    ).eval()
    _tv_randomize(tv, 0)

    cfg = C.faster_rcnn_model(depth=50, num_classes=num_classes)
    cfg.test_cfg.rpn.min_bbox_size = 1e-3  # torchvision's RPN min_size
    model = build_detector(cfg)
    assert isinstance(model, FasterRCNN)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)  # prepare_state_dict runs inside

    h, w = 128, 192  # multiples of 64: torchvision's strides are then exactly 4..64
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    # torchvision: mmdetection's (unrounded) base anchors, default test settings otherwise
    shapes = [(h // s, w // s) for s in (4, 8, 16, 32, 64)]
    from fgd_jax.ops.anchors import base_anchors

    tv.rpn.anchor_generator.cell_anchors = [
        torch.tensor(np.asarray(base_anchors(s, (8.0,), (0.5, 1.0, 2.0))))
        for s in (4, 8, 16, 32, 64)
    ]
    pool = MmdetRoIPool()
    tv.roi_heads.box_roi_pool = pool
    with torch.no_grad():
        feats_t = tv.backbone(x)
        obj_t, reg_t = tv.rpn.head(list(feats_t.values()))
        props_t, _ = tv.rpn(ImageList(x, [(h, w)]), feats_t)
        det_t, _ = tv.roi_heads(feats_t, props_t, [(h, w)])
    props_t, det_t = props_t[0].numpy(), det_t[0]

    image = jnp.asarray(nhwc(x))
    outs = jax.jit(lambda v, im: model.apply(v, im))(variables, image)
    # 1. FPN maps and RPN outputs
    assert len(outs["features"]) == 5
    errs = {"fpn": 0.0, "rpn_cls": 0.0, "rpn_reg": 0.0, "roi": 0.0}
    for o, r in zip(outs["features"], feats_t.values(), strict=True):
        errs["fpn"] = max(errs["fpn"], rel_err(o, nhwc(r)))
    for lvl in range(5):
        assert outs["rpn_cls_scores"][lvl].shape[1:3] == shapes[lvl]
        errs["rpn_cls"] = max(
            errs["rpn_cls"], rel_err(outs["rpn_cls_scores"][lvl], nhwc(obj_t[lvl]))
        )
        errs["rpn_reg"] = max(
            errs["rpn_reg"], rel_err(outs["rpn_bbox_preds"][lvl], nhwc(reg_t[lvl]))
        )
    assert max(errs.values()) < 1e-4, errs
    anchors_t = tv.rpn.anchor_generator(ImageList(x, [(h, w)]), list(feats_t.values()))[0]
    ours_anchors = np.concatenate([np.asarray(a) for a in rpn_anchors(shapes)])
    np.testing.assert_allclose(ours_anchors, anchors_t.numpy(), atol=1e-4)

    # 2. proposals: same set. torchvision's scores: its sigmoid objectness of the same boxes.
    props = outs["proposals"]
    valid = np.asarray(props["valid"][0])
    ours_boxes = np.asarray(props["boxes"][0])[valid]
    assert valid.sum() == len(props_t) > 300, (valid.sum(), len(props_t))
    assert np.all(valid[: valid.sum()])  # valid entries first
    match_sets(ours_boxes, np.zeros(len(ours_boxes)), props_t, np.zeros(len(props_t)), 1e-3, 1)

    # 3. RoI features per level on torchvision's proposals
    rois = torch.as_tensor(props_t)
    with torch.no_grad():
        roi_t = pool(feats_t, [rois])
    roi = extract_roi_feats(outs["features"][:4], jnp.asarray(props_t)[None])
    lv = pool.levels(rois).numpy()
    assert len(np.unique(lv)) >= 2  # the test covers several levels
    for lvl in np.unique(lv):
        errs["roi"] = max(
            errs["roi"], rel_err(np.asarray(roi[0])[lv == lvl], nhwc(roi_t[lv == lvl]))
        )
    assert errs["roi"] < 1e-4, errs

    # 4. detections
    # `predict` == `postprocess` of the test forward (one compilation of the backbone less)
    det = jax.jit(
        lambda v, o: model.apply(v, o, np.array([[h, w]]), np.ones((1, 4)), method="postprocess")
    )(variables, outs)
    ref_boxes, ref_scores = det_t["boxes"].numpy(), det_t["scores"].numpy()
    ref_labels = det_t["labels"].numpy() - 1  # torchvision: background is class 0
    n = int(np.asarray(det["valid"][0]).sum())
    assert len(ref_scores) == n == 100
    ours = {k: np.asarray(v[0])[:n] for k, v in det.items()}
    np.testing.assert_allclose(ours["scores"], ref_scores, atol=1e-5)  # sorted scores agree
    errs["det_score_abs"] = float(np.max(np.abs(ours["scores"] - ref_scores)))
    print("max errors vs torchvision:", errs)
    safe = ref_scores > ref_scores[-1] + 1e-4
    assert safe.sum() > 50
    for c in range(num_classes):
        mine = ours["labels"] == c
        ref = safe & (ref_labels == c)
        if ref.any():
            match_sets(
                ours["boxes"][mine],
                ours["scores"][mine],
                ref_boxes[ref],
                ref_scores[ref],
                1e-3,
                1e-5,
            )


# -------------------------------------------------------------------------------- sampling
def _random_boxes(rng, n, size=128.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(4, size * 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _expected_counts(assigned, num, frac):
    n_pos = min(int((assigned >= 0).sum()), int(num * frac))
    n_neg = min(int((assigned == assign_ops.NEGATIVE).sum()), num - n_pos)
    return n_pos, n_neg


@pytest.mark.slow  # three compilations (sampler sizes), ~10-15 s on 2 shared cores
def test_rpn_sampling_counts_order_padding_and_key():
    rng = np.random.default_rng(0)
    anchors = np.concatenate([np.asarray(a) for a in rpn_anchors([(16, 16), (8, 8)], (4, 8))])
    gt = np.zeros((5, 4), np.float32)
    gt[:3] = _random_boxes(rng, 3, 64.0)
    gt_valid = np.array([True, True, True, False, False])
    anchor_valid = rng.uniform(size=len(anchors)) > 0.2
    fn = jax.jit(rpn_targets, static_argnames=("num", "pos_fraction"))
    eager = np.asarray(
        assign_ops.max_iou_assign(anchors, gt, gt_valid, 0.7, 0.3, 0.3, anchor_valid=anchor_valid)[
            0
        ]
    )
    for num, frac in ((256, 0.5), (16, 0.5), (2000, 0.25)):
        t = fn(anchors, anchor_valid, gt, gt_valid, jax.random.key(3), num=num, pos_fraction=frac)
        # The assignment made inside (under jit XLA may fuse multiply-adds, so IoUs that
        # tie exactly in eager mode can differ by an ulp and change low-quality matches).
        assigned = np.asarray(t["assigned"])
        assert np.mean(assigned == eager) > 0.99
        n_pos, n_neg = _expected_counts(assigned, num, frac)
        valid, pos, inds = (np.asarray(t[k]) for k in ("valid", "pos", "inds"))
        assert int(t["num_pos"]) == pos.sum() == n_pos
        assert int(t["num_neg"]) == n_neg and valid.sum() == n_pos + n_neg
        assert np.all(valid[: n_pos + n_neg]) and np.all(pos[:n_pos]) and not pos[n_pos:].any()
        assert np.all(assigned[inds[pos]] >= 0)
        assert np.all(assigned[inds[valid & ~pos]] == assign_ops.NEGATIVE)
        assert np.all(anchor_valid[inds[valid]])  # padding (invalid anchors) never sampled
        assert len(np.unique(inds[valid])) == valid.sum()

    # reproducible with the key, different with another key
    def run(k):
        return fn(anchors, anchor_valid, gt, gt_valid, jax.random.key(k), num=256, pos_fraction=0.5)

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a["inds"], b["inds"])
    assert not np.array_equal(np.asarray(a["inds"]), np.asarray(c["inds"]))


def test_rcnn_targets_gt_as_proposals_padding_and_coder():
    rng = np.random.default_rng(1)
    g, p, num_classes = 4, 300, 5
    gt = np.zeros((g, 4), np.float32)
    gt[:3] = _random_boxes(rng, 3)
    gt_valid = np.array([True, True, True, False])
    labels = np.array([4, 0, 2, -1], np.int32)
    props = _random_boxes(rng, p)
    props[:40] = gt[np.arange(40) % 3] + rng.normal(0, 2, (40, 4)).astype(np.float32)
    prop_valid = np.arange(p) < 250  # the last 50 proposals are padding ...
    props[250:] = gt[0] + 0.5  # ... sitting on a GT: must still never be sampled
    gt[3] = [90, 90, 120, 120]  # a padded GT with real-looking coordinates
    targets_fn = jax.jit(rcnn_targets, static_argnums=6, static_argnames="num")
    t = targets_fn(props, prop_valid, gt, labels, gt_valid, jax.random.key(0), num_classes, num=128)
    assigned, _ = assign_ops.max_iou_assign(
        props, gt, gt_valid, 0.5, 0.5, 0.5, match_low_quality=False, anchor_valid=prop_valid
    )
    pool_assigned = np.concatenate([[0, 1, 2, assign_ops.IGNORE], np.asarray(assigned)])
    np.testing.assert_array_equal(np.asarray(t["assigned"]), pool_assigned)
    n_pos, n_neg = _expected_counts(pool_assigned, 128, 0.25)
    valid, pos, rois = np.asarray(t["valid"]), np.asarray(t["pos"]), np.asarray(t["rois"])
    assert pos.sum() == n_pos and valid.sum() == n_pos + n_neg
    assert np.all(pos[:n_pos]) and np.all(valid[: n_pos + n_neg])
    valid_pool = np.concatenate([gt[:3], props[:250]])
    d = np.abs(rois[valid][:, None] - valid_pool[None]).max(-1)
    assert np.all(d.min(1) == 0)  # every sampled RoI is a valid GT or proposal
    assert not np.any(np.all(rois[valid] == props[250], axis=1))
    assert not np.any(np.all(rois[valid] == gt[3], axis=1))
    assert np.all(rois[~valid] == 0)
    # labels: the matched GT's class for positives, background otherwise
    lab = np.asarray(t["labels"])
    assert np.all(lab[~pos] == num_classes) and np.all(lab[pos] < num_classes)
    ious = np.asarray(torchvision.ops.box_iou(torch.as_tensor(rois[pos]), torch.as_tensor(gt[:3])))
    np.testing.assert_array_equal(lab[pos], labels[ious.argmax(1)])
    assert np.all(ious.max(1) >= 0.5)
    # regression targets: torchvision BoxCoder with weights (10, 10, 5, 5) == stds 0.1/0.1/0.2/0.2
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref = coder.encode_single(torch.as_tensor(gt[ious.argmax(1)]), torch.as_tensor(rois[pos]))
    assert rel_err(np.asarray(t["bbox_targets"])[pos], ref.numpy()) < 1e-5
    assert np.all(np.asarray(t["bbox_targets"])[~pos] == 0)
    # all 3 valid GTs were added as proposals, so all of them can be sampled as positives
    t_all = targets_fn(
        props, prop_valid, gt, labels, gt_valid, jax.random.key(0), num_classes, num=2000
    )
    rois_all = np.asarray(t_all["rois"])[np.asarray(t_all["pos"])]
    for k in range(3):
        assert np.any(np.all(rois_all == gt[k], axis=1))
    assert not np.any(np.all(rois_all == gt[3], axis=1))


# ---------------------------------------------------------------------------------- losses
def test_losses_match_torch_mmdet_transcription():
    rng = np.random.default_rng(2)
    b, num_classes = 2, 3
    anchors = np.concatenate([np.asarray(a) for a in rpn_anchors([(16, 16), (8, 8)], (4, 8))])
    n = len(anchors)
    gt = np.zeros((b, 3, 4), np.float32)
    gt[0, :2] = [[10, 12, 44, 40], [30, 30, 62, 70]]
    gt[1, 0] = [20, 8, 52, 50]
    gt_valid = np.array([[True, True, False], [True, False, False]])
    cls = rng.normal(0, 1, (b, n)).astype(np.float32)
    reg = rng.normal(0, 0.5, (b, n, 4)).astype(np.float32)
    anchor_valid = np.ones((b, n), bool)
    t = jax.jit(rpn_batch_targets, static_argnames="num")(
        anchors, anchor_valid, gt, gt_valid, jax.random.key(5), num=64
    )
    losses = jax.jit(rpn_loss)(cls, reg, t)
    # mmdetection's AnchorHead.loss in torch on the same sampled anchors
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    num_cls = num_reg = 0.0
    total = 0
    for i in range(b):
        valid, pos, inds = (np.asarray(t[k][i]) for k in ("valid", "pos", "inds"))
        assert 0 < pos.sum() < valid.sum()
        num_cls += F.binary_cross_entropy_with_logits(
            torch.as_tensor(cls[i][inds[valid]]),
            torch.as_tensor(pos[valid]).float(),
            reduction="sum",
        ).item()
        pi = inds[pos]
        gt_i = np.asarray(t["assigned"][i])[pi]
        tgt = coder.encode_single(torch.as_tensor(gt[i][gt_i]), torch.as_tensor(anchors[pi]))
        num_reg += (torch.as_tensor(reg[i][pi]) - tgt).abs().sum().item()
        total += max(int(pos.sum()), 1) + max(int((valid & ~pos).sum()), 1)
    np.testing.assert_allclose(float(losses["loss_rpn_cls"]), num_cls / total, rtol=1e-5)
    np.testing.assert_allclose(float(losses["loss_rpn_bbox"]), num_reg / total, rtol=1e-4)

    # RoI head loss: CE over sampled RoIs / #sampled, L1 of the GT class's deltas / #sampled
    r = 32
    valid = np.arange(r)[None] < np.array([[30], [20]])
    pos = np.arange(r)[None] < np.array([[5], [0]])
    labels = np.where(pos, rng.integers(0, num_classes, (b, r)), num_classes).astype(np.int32)
    targets = dict(
        valid=jnp.asarray(valid),
        pos=jnp.asarray(pos),
        labels=jnp.asarray(labels),
        bbox_targets=jnp.asarray(np.where(pos[..., None], rng.normal(0, 1, (b, r, 4)), 0.0)),
    )
    cs = rng.normal(0, 1, (b, r, num_classes + 1)).astype(np.float32)
    bp = rng.normal(0, 1, (b, r, 4 * num_classes)).astype(np.float32)
    out = jax.jit(rcnn_loss, static_argnums=3)(cs, bp, targets, num_classes)
    ce = F.cross_entropy(
        torch.as_tensor(cs[valid]), torch.as_tensor(labels[valid]).long(), reduction="sum"
    )
    sel = torch.as_tensor(bp[pos]).view(-1, num_classes, 4)[
        torch.arange(int(pos.sum())), torch.as_tensor(labels[pos]).long()
    ]
    l1 = (sel - torch.as_tensor(np.asarray(targets["bbox_targets"])[pos])).abs().sum()
    np.testing.assert_allclose(float(out["loss_cls"]), ce.item() / valid.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_bbox"]), l1.item() / valid.sum(), rtol=1e-5)


# --------------------------------------------------------------------------- model / train
def _tiny_cfg(num_classes: int = 3):
    cfg = C.faster_rcnn_model(
        depth=18,
        num_classes=num_classes,
        fpn_channels=16,
        rpn_feat_channels=16,
        fc_out_channels=32,
        rpn_num=64,
        rcnn_num=32,
    )
    cfg.train_cfg.rpn_proposal.nms_pre = 200
    cfg.train_cfg.rpn_proposal.max_per_img = 64
    cfg.test_cfg.rpn.nms_pre = 200
    cfg.test_cfg.rpn.max_per_img = 64
    return cfg


def test_from_config_shapes_and_names():
    cfg = _tiny_cfg()
    model = build_detector(cfg)
    images = jnp.zeros((2, 64, 96, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    p = shapes["params"]
    assert set(p) == {"backbone", "neck", "rpn_head", "roi_head"}
    assert set(p["rpn_head"]) == {"rpn_conv", "rpn_cls", "rpn_reg"}
    head = p["roi_head"]["bbox_head"]
    assert set(head) == {"shared_fcs_0", "shared_fcs_1", "fc_cls", "fc_reg"}
    assert head["shared_fcs_0"]["kernel"].shape == (16 * 7 * 7, 32)
    assert head["fc_cls"]["kernel"].shape == (32, 4) and head["fc_reg"]["kernel"].shape == (32, 12)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes, images)
    assert [f.shape[1:3] for f in out["features"]] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert out["cls_score"].shape == (2, 64, 4) and out["bbox_pred"].shape == (2, 64, 12)
    with pytest.raises(ValueError, match="missing key 'rpn_head'"):
        del cfg["rpn_head"]
        FasterRCNN.from_config(cfg)


@pytest.mark.slow
def test_overfits_one_small_batch():
    model = build_detector(_tiny_cfg())
    batch = overfit_batch()
    variables = init_module(model, jax.random.key(0), batch["image"])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    names = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox")

    def loss_fn(p, key):
        losses, feats = model.apply(
            {"params": p, "batch_stats": stats},
            batch,
            method=FasterRCNN.forward_train,
            rngs={"sampler": key},
        )
        assert len(feats) == 5
        return sum(losses.values()), losses

    @jax.jit
    def step(p, o, key):
        (_, losses), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, losses

    history = []
    for i in range(50):
        params, opt, losses = step(params, opt, jax.random.key(i))
        history.append([float(losses[k]) for k in names])
    history = np.asarray(history)
    assert np.all(np.isfinite(history))
    first, last = history[:3].mean(0), history[-5:].mean(0)
    print(dict(zip(names, zip(first, last, strict=True), strict=True)))
    assert np.all(last < 0.6 * first), dict(zip(names, zip(first, last, strict=True), strict=True))
    det = jax.jit(
        lambda p, im: model.apply(
            {"params": p, "batch_stats": stats},
            im,
            batch["img_shape"],
            batch["scale_factor"],
            method=FasterRCNN.predict,
        )
    )(params, batch["image"])
    # the top detection of image 1 is its single GT box, with its class
    assert bool(det["valid"][1, 0]) and int(det["labels"][1, 0]) == 1
    iou = torchvision.ops.box_iou(
        torch.tensor(np.asarray(det["boxes"][1, :1])),
        torch.tensor(np.asarray(batch["boxes"][1, :1])),
    )
    assert float(iou) > 0.5

"""FCOS (fgd_jax.models.fcos) against independent references.

References and tolerances:
- torchvision `fcos_resnet50_fpn` (random weights, randomized BN statistics, eval), converted
  with `fgd_jax.convert.torchvision_fcos`: head outputs per level within 1e-4 relative (fp32),
  and torchvision's `postprocess_detections` equal to `score_style='torchvision'` (same boxes,
  scores within 1e-4, same labels).
- Target assignment: a per-point, per-GT Python loop written from mmdetection 2.11
  `FCOSHead._get_target_single` rules (exact), plus hand-checked points (nested boxes, level
  boundaries, padding).
- The loss: a torch transcription of mmdetection 2.11 `FCOSHead.loss` (focal loss via
  `torchvision.ops.sigmoid_focal_loss`, GIoU via `torchvision.ops.generalized_box_iou_loss`,
  IoU 'log' loss and centerness BCE in torch) on random outputs, within 1e-5 relative.
- The postprocess ('mmdet'): a torch transcription of mmdetection 2.11 `FCOSHead._get_bboxes` +
  `multiclass_nms(score_factors=centerness)` using `torchvision.ops.batched_nms`.
- mmdetection checkpoint layout: a torch FCOS written here with mmdetection 2.11's parameter
  names (mmcv `ConvModule` `.conv`/`.gn`, 0-d `Scale.scale`, FPN `lateral_convs`/`fpn_convs`,
  torchvision's ResNet keys = mmdetection's) and `FCOSHead.forward_single`: strict import,
  strict `load_state_dict` of our export, head outputs within 1e-4 relative (both variants).
- Input normalisation: mmdetection's `Normalize` (BGR minus the variant's mean, std 1) then
  zero padding, written here, vs our pipeline's `normalize_pad` + the model's `input_shift`.
- Configs: values from mmdetection 2.11 `configs/fcos/` and yzd-v/FGD's FCOS configs.
- FGD training: the student variant under the SGD recipe, every loss part falls (own first
  steps as the reference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.image_list import ImageList

from fgd_jax import config as C
from fgd_jax.data import SHAPES_CLASS_NAMES
from fgd_jax.models import build_detector, init_module
from fgd_jax.models import fcos as fc

STRIDES = (8, 16, 32, 64, 128)
RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))


def _rel_close(got, ref, rtol=1e-4, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)
    assert err < rtol, f"{what}: max relative error {err:.2e} >= {rtol}"
    return err


def _level_info(shapes):
    counts = [h * w for h, w in shapes]
    pts = np.concatenate([np.asarray(p) for p in fc.fcos_points(shapes, STRIDES)], 0)
    strides = np.concatenate(
        [np.full(n, s, np.float32) for n, s in zip(counts, STRIDES, strict=True)]
    )
    ranges = np.concatenate(
        [np.tile(np.array(r, np.float32), (n, 1)) for n, r in zip(counts, RANGES, strict=True)]
    )
    return counts, pts, strides, ranges


# ------------------------------------------------------------------------------ targets
def _loop_targets(points, strides, ranges, boxes, labels, valid, num_classes, cs, radius):
    """Per point, per GT, straight from the mmdetection 2.11 rules."""
    n = len(points)
    out_l = np.full(n, num_classes, np.int64)
    out_t = np.zeros((n, 4), np.float32)
    for i, (x, y) in enumerate(points):
        best, best_area = -1, 1e8
        for g, (b, ok) in enumerate(zip(boxes, valid, strict=False)):
            if not ok:
                continue
            d = [x - b[0], y - b[1], b[2] - x, b[3] - y]
            if cs:
                cx, cy, r = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, strides[i] * radius
                cb = [max(cx - r, b[0]), max(cy - r, b[1]), min(cx + r, b[2]), min(cy + r, b[3])]
                inside = min(x - cb[0], y - cb[1], cb[2] - x, cb[3] - y) > 0
            else:
                inside = min(d) > 0
            in_range = ranges[i][0] <= max(d) <= ranges[i][1]
            area = (b[2] - b[0]) * (b[3] - b[1])
            if inside and in_range and area < best_area:
                best, best_area = g, area
        if best >= 0:
            b = boxes[best]
            out_l[i] = labels[best]
            out_t[i] = [x - b[0], y - b[1], b[2] - x, b[3] - y]
    return out_l, out_t


@pytest.mark.parametrize("center_sampling", [False, True])
def test_targets_match_rule_loop_and_hand_checks(center_sampling):
    shapes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]  # a 96 x 160 canvas
    counts, pts, strides, ranges = _level_info(shapes)
    boxes = np.array(
        [
            [0.0, 0.0, 80.0, 80.0],  # big: P3 points near its centre are too far (> 64)
            [16.0, 16.0, 40.0, 40.0],  # nested in box 0: smaller area wins where both fit
            [100.0, 20.0, 132.0, 84.0],  # 32 x 64: centre point (116, 52) has max dist 32
            [0.0, 0.0, 160.0, 96.0],  # padding that would match everywhere: must never win
            [0.0, 0.0, 0.0, 0.0],  # zero padding
        ],
        np.float32,
    )
    labels = np.array([1, 2, 3, 4, -1], np.int32)
    valid = np.array([True, True, True, False, False])
    got_l, got_t = jax.jit(
        lambda b, l, v: fc.fcos_targets(
            jnp.asarray(pts), jnp.asarray(strides), jnp.asarray(ranges), b, l, v, 5, center_sampling
        )
    )(boxes, labels, valid)
    ref_l, ref_t = _loop_targets(
        pts, strides, ranges, boxes, labels, valid, 5, center_sampling, 1.5
    )
    np.testing.assert_array_equal(np.asarray(got_l), ref_l)
    pos = ref_l < 5
    np.testing.assert_array_equal(np.asarray(got_t)[pos], ref_t[pos])
    assert 4 not in set(np.asarray(got_l).tolist())  # the padded box never wins

    def lab(level, x, y):
        off = sum(counts[:level])
        return int(got_l[off + y * shapes[level][1] + x])

    # P3 point (28, 28) (cell 3, 3): inside box 1 (nested, smaller) -> label 2.
    assert lab(0, 3, 3) == 2
    # P4 point (40, 40): box 0 max distance 40 -> range (64, 128] fails; box 1 border -> bg.
    assert lab(1, 2, 2) == 5
    if not center_sampling:
        # P3 point (4, 76): box 0 distances (4, 76, 76, 4): max 76 > 64 -> not at P3.
        assert lab(0, 0, 9) == 5
        # P4 point (8, 8): box 0 distances (8, 8, 72, 72): max 72 in [64, 128] -> label 1.
        assert lab(1, 0, 0) == 1
    # P3 point (116, 52) (cell 14, 6): box 2, max distance 32 <= 64 -> label 3.
    assert lab(0, 14, 6) == 3
    # Boundary: P3 point (12, 12) of a box [12 - 64 + 52, ...] has max distance exactly 64.
    edge = np.array([[4.0, 4.0, 76.0, 60.0]], np.float32)  # point (12, 12): (8, 8, 64, 48)
    el, _ = fc.fcos_targets(
        jnp.asarray(pts),
        jnp.asarray(strides),
        jnp.asarray(ranges),
        edge,
        np.array([0]),
        np.array([True]),
        5,
    )
    assert int(el[1 * 20 + 1]) == 0  # P3 (12, 12): max 64 <= 64 (inclusive upper bound)
    # P4 (24, 24): (20, 20, 52, 36): max 52 < 64 -> not at P4
    assert int(el[counts[0] + 1 * 10 + 1]) == 5


def test_centerness_target_matches_formula():
    t = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.5, 8.0, 2.0, 1.0]], np.float32)
    ref = np.sqrt(
        np.minimum(t[:, 0], t[:, 2])
        / np.maximum(t[:, 0], t[:, 2])
        * np.minimum(t[:, 1], t[:, 3])
        / np.maximum(t[:, 1], t[:, 3])
    )
    np.testing.assert_allclose(np.asarray(fc.centerness_target(t)), ref, rtol=1e-6)


def test_point_valid_flags():
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    flags = np.asarray(fc.point_valid_flags(shapes, STRIDES, np.array([[30, 50], [64, 96]]), 32))
    p3 = flags[0, :96].reshape(8, 12)
    # image 30 x 50 -> padded 32 x 64 -> P3 rows < 4, cols < 8
    assert p3[:4, :8].all() and not p3[4:].any() and not p3[:, 8:].any()
    assert flags[1].all()
    assert np.asarray(fc.point_valid_flags(shapes, STRIDES, np.array([[30, 50]]), 0)).all()


# --------------------------------------------------------------------------------- loss
def _torch_mmdet_loss(cls, reg, ctr, pts, strides, ranges, boxes, labels, valid, C_, tricks):
    """Transcription of mmdetection 2.11 FCOSHead.loss (+ get_targets) in torch."""
    pts, strides, ranges = map(torch.as_tensor, (pts, strides, ranges))
    all_labels, all_targets = [], []
    for b in range(cls.shape[0]):
        gt = torch.as_tensor(boxes[b][valid[b]])
        gl = torch.as_tensor(labels[b][valid[b]]).long()
        n, g = len(pts), len(gt)
        areas = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].repeat(n, 1)
        rr = ranges[:, None, :].expand(n, g, 2)
        gb = gt[None].expand(n, g, 4)
        xs, ys = pts[:, 0, None].expand(n, g), pts[:, 1, None].expand(n, g)
        t = torch.stack((xs - gb[..., 0], ys - gb[..., 1], gb[..., 2] - xs, gb[..., 3] - ys), -1)
        if tricks:
            cx, cy = (gb[..., 0] + gb[..., 2]) / 2, (gb[..., 1] + gb[..., 3]) / 2
            st = (strides * 1.5)[:, None].expand(n, g)
            x0, y0, x1, y1 = cx - st, cy - st, cx + st, cy + st
            c0 = torch.where(x0 > gb[..., 0], x0, gb[..., 0])
            c1 = torch.where(y0 > gb[..., 1], y0, gb[..., 1])
            c2 = torch.where(x1 > gb[..., 2], gb[..., 2], x1)
            c3 = torch.where(y1 > gb[..., 3], gb[..., 3], y1)
            inside = torch.stack((xs - c0, ys - c1, c2 - xs, c3 - ys), -1).min(-1)[0] > 0
        else:
            inside = t.min(-1)[0] > 0
        md = t.max(-1)[0]
        in_range = (md >= rr[..., 0]) & (md <= rr[..., 1])
        areas[~inside] = 1e8
        areas[~in_range] = 1e8
        min_area, idx = areas.min(1)
        lab = gl[idx]
        lab[min_area == 1e8] = C_
        tt = t[range(n), idx]
        if tricks:
            tt = tt / strides[:, None]
        all_labels.append(lab)
        all_targets.append(tt)
    flat_cls = torch.as_tensor(cls).reshape(-1, C_)
    flat_reg = torch.as_tensor(reg).reshape(-1, 4)
    flat_ctr = torch.as_tensor(ctr).reshape(-1)
    flat_lab = torch.cat(all_labels)
    flat_t = torch.cat(all_targets)
    flat_pts = pts.repeat(cls.shape[0], 1)
    pos = ((flat_lab >= 0) & (flat_lab < C_)).nonzero().reshape(-1)
    num_pos = max(float(len(pos)), 1.0)
    onehot = F.one_hot(flat_lab, C_ + 1)[:, :C_].float()
    loss_cls = torchvision.ops.sigmoid_focal_loss(flat_cls, onehot, 0.25, 2.0, "sum") / num_pos
    pt = flat_t[pos]
    lr, tb = pt[:, [0, 2]], pt[:, [1, 3]]
    ctr_t = torch.sqrt(lr.min(-1)[0] / lr.max(-1)[0] * (tb.min(-1)[0] / tb.max(-1)[0]))
    denorm = max(float(ctr_t.sum()), 1e-6)
    pp = flat_pts[pos]

    def decode(d):
        return torch.stack(
            [pp[:, 0] - d[:, 0], pp[:, 1] - d[:, 1], pp[:, 0] + d[:, 2], pp[:, 1] + d[:, 3]], -1
        )

    pb, tgt = decode(flat_reg[pos]), decode(pt)
    if tricks:
        per = torchvision.ops.generalized_box_iou_loss(pb, tgt, reduction="none")
    else:
        lt = torch.max(pb[:, :2], tgt[:, :2])
        rb = torch.min(pb[:, 2:], tgt[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        a1 = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
        a2 = (tgt[:, 2] - tgt[:, 0]) * (tgt[:, 3] - tgt[:, 1])
        iou = inter / (a1 + a2 - inter).clamp(min=1e-6)
        per = -iou.clamp(min=1e-6).log()
    loss_bbox = (per * ctr_t).sum() / denorm
    loss_ctr = F.binary_cross_entropy_with_logits(flat_ctr[pos], ctr_t, reduction="sum") / num_pos
    return dict(
        loss_cls=loss_cls.item(),
        loss_bbox=loss_bbox.item(),
        loss_centerness=loss_ctr.item(),
        num_pos=len(pos),
    )


def _random_gt(rng, batch, g, h, w, n_valid):
    boxes = np.zeros((batch, g, 4), np.float32)
    labels = np.full((batch, g), -1, np.int32)
    valid = np.zeros((batch, g), bool)
    for b in range(batch):
        for i in range(n_valid[b]):
            bw, bh = rng.uniform(6, w * 0.9), rng.uniform(6, h * 0.9)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes[b, i] = [x0, y0, x0 + bw, y0 + bh]
            labels[b, i] = rng.integers(0, 4)
            valid[b, i] = True
    return boxes, labels, valid


@pytest.mark.parametrize("tricks", [False, True])
def test_loss_matches_torch_mmdet_transcription(tricks):
    rng = np.random.default_rng(0)
    shapes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]  # 96 x 160 canvas
    counts, pts, strides, ranges = _level_info(shapes)
    n, B, C_ = len(pts), 2, 4
    boxes, labels, valid = _random_gt(rng, B, 6, 96, 160, [4, 2])
    boxes[0, 3] = [0, 0, 150, 90]  # a big one so the coarse levels get positives too
    cls = rng.normal(size=(B, n, C_)).astype(np.float32)
    reg = np.exp(rng.normal(size=(B, n, 4))).astype(np.float32)
    if not tricks:
        reg = reg * strides[None, :, None]
    ctr = rng.normal(size=(B, n)).astype(np.float32)
    got = jax.jit(
        lambda c, r, z, b, l, v: fc.fcos_loss(
            c,
            r,
            z,
            jnp.asarray(pts),
            jnp.asarray(strides),
            jnp.asarray(ranges),
            jnp.ones((B, n), bool),
            b,
            l,
            v,
            C_,
            center_sampling=tricks,
            norm_on_bbox=tricks,
            loss_bbox_type="giou" if tricks else "iou",
        )
    )(cls, reg, ctr, boxes, labels, valid)
    ref = _torch_mmdet_loss(cls, reg, ctr, pts, strides, ranges, boxes, labels, valid, C_, tricks)
    assert ref["num_pos"] > 20
    for k in ("loss_cls", "loss_bbox", "loss_centerness"):
        _rel_close(float(got[k]), ref[k], 1e-5, k)


def test_loss_without_gt_is_finite_and_only_cls():
    shapes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    _, pts, strides, ranges = _level_info(shapes)
    n = len(pts)
    cls = jnp.zeros((1, n, 3))

    def f(c):
        return fc.fcos_loss(
            c,
            jnp.ones((1, n, 4)),
            jnp.zeros((1, n)),
            jnp.asarray(pts),
            jnp.asarray(strides),
            jnp.asarray(ranges),
            jnp.ones((1, n), bool),
            jnp.zeros((1, 2, 4)),
            -jnp.ones((1, 2), jnp.int32),
            jnp.zeros((1, 2), bool),
            3,
            True,
            1.5,
            True,
            "giou",
        )

    f = jax.jit(f)
    out = f(cls)
    assert float(out["loss_bbox"]) == 0.0 and float(out["loss_centerness"]) == 0.0
    # focal loss of logit 0 against all-negative targets, / max(num_pos, 1) = 1
    p = 0.5
    ref = n * 3 * (0.75 * p**2 * -math.log(1 - p))
    _rel_close(float(out["loss_cls"]), ref, 1e-6, "loss_cls")
    g = jax.jit(jax.grad(lambda c: sum(jax.tree_util.tree_leaves(f(c)))))(cls)
    assert np.isfinite(np.asarray(g)).all()


# --------------------------------------------------------------------------- postprocess
def _torch_mmdet_postprocess(
    cls, reg, ctr, pts, strides, img_shape, sf, C_, nms_pre, thr, iou, k, norm
):
    boxes_l, scores_l, ctr_l = [], [], []
    for c, r, z, p, s in zip(cls, reg, ctr, pts, strides, strict=False):
        sc = torch.as_tensor(c).reshape(-1, C_).sigmoid()
        ce = torch.as_tensor(z).reshape(-1).sigmoid()
        d = torch.as_tensor(r).reshape(-1, 4) * (s if norm else 1)
        p = torch.from_numpy(np.array(p))
        if 0 < nms_pre < sc.shape[0]:
            _, ti = (sc * ce[:, None]).max(1)[0].topk(nms_pre)
            sc, ce, d, p = sc[ti], ce[ti], d[ti], p[ti]
        bx = torch.stack(
            [p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], -1
        )
        bx[:, 0::2] = bx[:, 0::2].clamp(0, img_shape[1])
        bx[:, 1::2] = bx[:, 1::2].clamp(0, img_shape[0])
        boxes_l.append(bx)
        scores_l.append(sc)
        ctr_l.append(ce)
    bx = torch.cat(boxes_l) / torch.as_tensor(sf)
    sc, ce = torch.cat(scores_l), torch.cat(ctr_l)
    # multiclass_nms(score_factors=centerness)
    bb = bx[:, None].expand(-1, C_, 4).reshape(-1, 4)
    lab = torch.arange(C_)[None].expand_as(sc).reshape(-1)
    keep = sc.reshape(-1) > thr
    s = (sc * ce[:, None]).reshape(-1)
    bb, s, lab = bb[keep], s[keep], lab[keep]
    kk = torchvision.ops.batched_nms(bb, s, lab, iou)[:k]
    return bb[kk].numpy(), s[kk].numpy(), lab[kk].numpy()


def _check_dets(got, b, ref_boxes, ref_scores, ref_labels, rtol=1e-4):
    v = np.asarray(got["valid"][b])
    n = int(v.sum())
    assert n == len(ref_scores), (n, len(ref_scores))
    assert v[:n].all() and not v[n:].any()
    np.testing.assert_array_equal(np.asarray(got["labels"][b][:n]), ref_labels)
    _rel_close(got["scores"][b][:n], ref_scores, rtol, "scores")
    _rel_close(got["boxes"][b][:n], ref_boxes, rtol, "boxes")


@pytest.mark.parametrize("norm", [False, True])
def test_postprocess_matches_torch_mmdet_transcription(norm):
    rng = np.random.default_rng(1)
    shapes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    C_, B = 3, 2
    cls = [rng.normal(-1.5, 1.5, size=(B, h, w, C_)).astype(np.float32) for h, w in shapes]
    reg = [
        (rng.uniform(0.2, 3.0, size=(B, h, w, 4)) * (1 if norm else s)).astype(np.float32)
        for (h, w), s in zip(shapes, STRIDES, strict=False)
    ]
    ctr = [rng.normal(size=(B, h, w, 1)).astype(np.float32) for h, w in shapes]
    pts = fc.fcos_points(shapes, STRIDES)
    img_shape = np.array([[90, 150], [70, 160]], np.int32)
    sf = np.array([[1.5, 1.5, 1.5, 1.5], [0.5, 0.5, 0.5, 0.5]], np.float32)
    kw = dict(nms_pre=100, score_thr=0.3, iou_threshold=0.5, max_per_img=50)
    got = jax.jit(
        lambda c, r, z, i, f: fc.fcos_postprocess(
            c, r, z, pts, STRIDES, i, f, C_, norm_on_bbox=norm, **kw
        )
    )(cls, reg, ctr, img_shape, sf)
    for b in range(B):
        ref = _torch_mmdet_postprocess(
            [c[b] for c in cls],
            [r[b] for r in reg],
            [z[b] for z in ctr],
            pts,
            STRIDES,
            img_shape[b],
            sf[b],
            C_,
            kw["nms_pre"],
            kw["score_thr"],
            kw["iou_threshold"],
            kw["max_per_img"],
            norm,
        )
        assert len(ref[1]) > 10
        _check_dets(got, b, *ref)


# --------------------------------------------------------------------- torchvision parity
def _randomize_torchvision(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
        head = model.head
        for conv in (
            head.regression_head.bbox_reg,
            head.regression_head.bbox_ctrness,
            head.classification_head.cls_logits,
        ):
            conv.weight.normal_(0, 0.03, generator=gen)
            conv.bias.normal_(0, 0.5, generator=gen)
        head.classification_head.cls_logits.bias.add_(-1.0)


@pytest.fixture(scope="module")
def torchvision_pair():
    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.convert.torchvision_fcos import torchvision_fcos_config

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tv = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, score_thresh=0.3
    )
    _randomize_torchvision(tv, gen)
    tv.eval()
    cfg = torchvision_fcos_config(num_classes=5, score_thr=0.3)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)
    return tv, cfg, variables


@pytest.mark.slow
def test_torchvision_fcos_head_outputs_and_detections(torchvision_pair):
    tv, cfg, variables = torchvision_pair
    x = torch.randn(1, 3, 128, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = list(tv.backbone(x).values())
        out = tv.head(feats)
        counts = [f.shape[2] * f.shape[3] for f in feats]
        anchors = tv.anchor_generator(ImageList(x, [(128, 256)]), feats)
        split = {k: list(v.split(counts, dim=1)) for k, v in out.items()}
        dets = tv.postprocess_detections(
            split, [list(a.split(counts)) for a in anchors], [(128, 256)]
        )[0]
    model = build_detector(cfg)
    images = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    ours = jax.jit(lambda v, im: model.apply(v, im))(variables, images)
    for lvl, f in enumerate(feats):
        h, w = f.shape[2:]
        _rel_close(ours["features"][lvl], f.permute(0, 2, 3, 1).numpy(), 1e-4, f"P{lvl + 3}")
        _rel_close(
            ours["cls_scores"][lvl],
            split["cls_logits"][lvl].reshape(1, h, w, 5).numpy(),
            1e-4,
            "cls",
        )
        _rel_close(
            ours["bbox_preds"][lvl],
            split["bbox_regression"][lvl].reshape(1, h, w, 4).numpy(),
            1e-4,
            "reg",
        )
        _rel_close(
            ours["centernesses"][lvl],
            split["bbox_ctrness"][lvl].reshape(1, h, w, 1).numpy(),
            1e-4,
            "ctr",
        )
    got = model.apply(
        variables, ours, np.array([[128, 256]]), np.ones((1, 4), np.float32), method="postprocess"
    )
    assert len(dets["scores"]) > 10
    _check_dets(got, 0, dets["boxes"].numpy(), dets["scores"].numpy(), dets["labels"].numpy())


# -------------------------------------------------------------------------- tiny model
def _tiny_cfg(tricks=True, style="pytorch", pixel_mean=None):
    cfg = C.fcos_model(
        depth=18,
        num_classes=3,
        tricks=tricks,
        feat_channels=16,
        fpn_channels=16,
        stacked_convs=2,
        num_groups=4,
        style=style,
        **({"pixel_mean": pixel_mean} if style == "caffe" else {}),
    )
    cfg.test_cfg.max_candidates = 300
    return cfg


def _tiny_batch(rng, b=2, size=64):
    boxes, labels, valid = _random_gt(rng, b, 4, size, size, [2, 3])
    img = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    return dict(
        image=img,
        boxes=boxes,
        labels=np.where(valid, labels % 3, -1).astype(np.int32),
        valid=valid,
        img_shape=np.full((b, 2), size, np.int32),
        scale_factor=np.ones((b, 4), np.float32),
    )


@pytest.mark.slow
def test_tiny_model_api_and_names():
    model = build_detector(_tiny_cfg())
    batch = _tiny_batch(np.random.default_rng(0))
    variables = init_module(model, jax.random.key(0), batch["image"])
    head = variables["params"]["bbox_head"]
    names = {"cls_convs_0", "reg_convs_1", "conv_cls", "conv_reg", "conv_centerness", "scales_4"}
    assert set(head) >= names
    assert set(head["cls_convs_0"]) == {"conv", "gn"} and "bias" in head["cls_convs_0"]["conv"]
    assert head["scales_0"]["scale"].shape == ()
    plain = jax.eval_shape(
        build_detector(_tiny_cfg(tricks=False)).init, jax.random.key(0), batch["image"]
    )
    assert "bias" not in plain["params"]["bbox_head"]["cls_convs_0"]["conv"]

    @jax.jit
    def run(v, b):
        outs = model.apply(v, b["image"])
        losses, feats = model.apply(v, b, method="forward_train")
        dets = model.postprocess(outs, b["img_shape"], b["scale_factor"])
        return outs, losses, feats, dets

    outs, losses, feats, dets = run(variables, batch)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert [c.shape for c in outs["cls_scores"]] == [(2, h, w, 3) for h, w in sizes]
    assert outs["centernesses"][0].shape == (2, 8, 8, 1) and len(feats) == 5
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert dets["boxes"].shape == (2, 100, 4) and dets["labels"].dtype == jnp.int32
    # at init every class probability is ~0.01 < score_thr: nothing is detected
    assert not bool(dets["valid"].any()) and bool((dets["labels"] == -1).all())
    with pytest.raises(KeyError, match="boxes"):
        model.apply(variables, {"image": batch["image"]}, method="forward_train")


def test_config_errors_are_clear():
    cfg = _tiny_cfg()
    cfg.head.loss_bbox = "l1"
    with pytest.raises(ValueError, match="head.loss_bbox"):
        build_detector(cfg)
    cfg = _tiny_cfg()
    cfg.head.regress_ranges = cfg.head.regress_ranges[:3]
    with pytest.raises(ValueError, match="regress_ranges"):
        build_detector(cfg)


@pytest.mark.slow
def test_tiny_fcos_overfits_one_batch():
    """Focal + GIoU drop > 80% in 100 Adam steps (backbone frozen to keep it fast; the
    centerness BCE has a floor, the entropy of its soft targets, so it only has to drop)."""
    import optax

    cfg = _tiny_cfg()
    cfg.backbone.frozen_stages = 4
    model = build_detector(cfg)
    batch = _tiny_batch(np.random.default_rng(3))
    variables = init_module(model, jax.random.key(0), batch["image"])
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def total(p):
        losses, _ = model.apply({"params": p, **rest}, batch, method="forward_train")
        return sum(losses.values()), losses

    @jax.jit
    def step(p, s):
        (_, losses), g = jax.value_and_grad(total, has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, losses

    first = None
    for _ in range(100):
        params, state, losses = step(params, state)
        first = first or {k: float(v) for k, v in losses.items()}
    last = {k: float(v) for k, v in losses.items()}
    assert last["loss_cls"] + last["loss_bbox"] < 0.2 * (first["loss_cls"] + first["loss_bbox"])
    assert last["loss_centerness"] < first["loss_centerness"]


# ------------------------------------------------------------------ input mean (per variant)
PLAIN_MEAN = (102.9801, 115.9465, 122.7717)  # mmdetection 2.11 fcos_r*_caffe_fpn_gn-head*
TRICKS_MEAN = (103.53, 116.28, 123.675)  # fcos_center-normbbox-giou_* (the FGD student)


def _tiny_caffe_cfg(tricks=False, pixel_mean=None):
    return _tiny_cfg(tricks, "caffe", pixel_mean)


def test_pixel_mean_defaults_follow_the_variant():
    assert tuple(C.fcos_model(tricks=False).pixel_mean) == PLAIN_MEAN
    assert tuple(C.fcos_model(tricks=True).pixel_mean) == TRICKS_MEAN
    assert tuple(C.fcos_model().data_pixel_mean) == tuple(C.CAFFE_PIXEL_MEAN) == TRICKS_MEAN
    assert C.fcos_model(style="pytorch").pixel_mean is None
    with pytest.raises(ValueError, match="pixel_mean"):
        C.fcos_model(style="pytorch", pixel_mean=PLAIN_MEAN)
    plain = build_detector(C.fcos_model(tricks=False))
    np.testing.assert_allclose(plain.input_shift, np.subtract(TRICKS_MEAN, PLAIN_MEAN), atol=1e-9)
    assert build_detector(C.fcos_model(tricks=True)).input_shift == (0.0, 0.0, 0.0)
    cfg = C.fcos_model()
    cfg.data_pixel_mean = None
    with pytest.raises(ValueError, match="data_pixel_mean"):
        build_detector(cfg)


def test_input_shift_gives_mmdet_normalisation_inside_the_image_only():
    """Our pipeline ('caffe': BGR - (103.53, ...), zero padding) + the plain model's shift ==
    mmdetection's plain FCOS input (BGR - (102.9801, ...), then zero padding), written here."""
    from fgd_jax.data import transforms as T

    rng = np.random.default_rng(0)
    h, w, canvas = 40, 56, (64, 64)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours_in = T.normalize_pad(rgb, canvas, "caffe")[None]
    ref_in = np.zeros((1, *canvas, 3), np.float32)
    ref_in[0, :h, :w] = rgb[:, :, ::-1].astype(np.float32) - np.float32(PLAIN_MEAN)
    img_shape = np.array([[h, w]], np.int32)

    shifted = np.asarray(fc.shift_input(jnp.asarray(ours_in), (0.5499, 0.3335, 0.9033), img_shape))
    np.testing.assert_allclose(shifted, ref_in, atol=1e-4)
    assert not shifted[0, h:].any() and not shifted[0, :, w:].any()  # padding stays 0

    model = build_detector(_tiny_caffe_cfg(tricks=False))  # shift (0.5499, 0.3335, 0.9033)
    ref_model = build_detector(_tiny_caffe_cfg(tricks=False, pixel_mean=TRICKS_MEAN))  # none
    assert ref_model.input_shift == (0.0, 0.0, 0.0)
    variables = init_module(model, jax.random.key(0), ours_in)
    batch = dict(
        image=ours_in,
        boxes=np.array([[[4.0, 4.0, 30.0, 36.0]]], np.float32),
        labels=np.array([[1]], np.int32),
        valid=np.array([[True]]),
        img_shape=img_shape,
    )

    @jax.jit
    def run(v):
        _, feats = model.apply(v, batch, method="forward_train")
        ref = ref_model.apply(v, jnp.asarray(ref_in), method="extract_feat")
        unbounded = model.apply(v, jnp.asarray(ours_in), method="extract_feat")
        return feats, ref, unbounded

    feats, ref, unbounded = run(variables)
    for lvl, (f, r) in enumerate(zip(feats, ref, strict=True)):
        _rel_close(f, r, 1e-5, f"P{lvl + 3}")
    # without img_shape the shift also lands on the padding: a different input
    assert not np.allclose(np.asarray(unbounded[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- configs
def _load(name):
    import os

    return C.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", name))


def test_fcos_configs_follow_mmdet_and_fgd():
    """Values verified against mmdetection 2.11 `configs/fcos/` and yzd-v/FGD's
    `fgd_fcos_r101_distill_fcos_r50_2x_coco.py` + its student config (see the config files)."""
    teacher, student, fgd = (
        _load(n) for n in ("fcos_r101_baseline.py", "fcos_r50_baseline.py", "fcos_r101_r50.py")
    )
    for cfg in (teacher, student, fgd):
        assert cfg.data.pixel_style == "caffe"
        assert tuple(cfg.data.multiscale_short) == (640, 800)
        assert cfg.data.multiscale_mode == "value"
        tr = cfg.train
        assert (tr.batch_size, tr.base_lr, tr.optimizer, tr.momentum) == (16, 0.01, "sgd", 0.9)
        assert (tr.weight_decay, tr.bias_lr_mult, tr.bias_decay_mult) == (1e-4, 2.0, 0.0)
        assert (tr.num_epochs, tuple(tr.decay_epochs)) == (24, (16, 22))
        assert (tr.warmup_iters, tr.warmup_ratio) == (500, 1.0 / 3)
        assert cfg.model.backbone.style == "caffe" and not cfg.model.backbone.norm_requires_grad
    # the plain teacher was trained on (102.9801, ...); the student configs use (103.53, ...)
    assert tuple(teacher.model.pixel_mean) == PLAIN_MEAN
    assert (teacher.train.warmup, teacher.train.grad_clip_norm) == ("constant", 35.0)
    assert not teacher.model.head.center_sampling and teacher.model.head.loss_bbox == "iou"
    assert tuple(student.model.pixel_mean) == TRICKS_MEAN
    assert (student.train.warmup, student.train.grad_clip_norm) == ("linear", 0.0)
    # FGD: one image, normalised by the student's pipeline, feeds both networks
    assert tuple(fgd.model.pixel_mean) == TRICKS_MEAN
    assert tuple(fgd.teacher.model.pixel_mean) == TRICKS_MEAN
    assert build_detector(fgd.teacher.model).input_shift == (0.0, 0.0, 0.0)
    assert fgd.teacher.model.backbone.depth == 101 and fgd.model.backbone.depth == 50
    assert not fgd.teacher.model.head.norm_on_bbox and fgd.model.head.norm_on_bbox
    assert fgd.model.head.center_sampling and fgd.model.head.loss_bbox == "giou"
    assert fgd.model.test_cfg.iou_threshold == 0.6 and not fgd.model.head.centerness_on_reg
    d = fgd.distill
    assert (d.temp, d.alpha_fgd, d.beta_fgd, d.gamma_fgd, d.lambda_fgd) == (
        0.8,
        0.0016,
        0.0008,
        0.0008,
        0.000008,
    )
    assert d.num_levels == 5 and d.init_student and d.box_scale == "img_shape"
    assert (fgd.train.warmup, fgd.train.grad_clip_norm) == ("linear", 35.0)


# ------------------------------------------------------------- mmdetection layout (torch)
class _ConvModule(torch.nn.Module):
    """mmcv `ConvModule` as FCOS uses it: `.conv` (+ `.gn` and ReLU when `groups`)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, bias=True, groups=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=bias)
        self.gn = torch.nn.GroupNorm(groups, cout) if groups else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(self.gn(x)) if self.gn is not None else x


class _Scale(torch.nn.Module):
    """mmcv `Scale`: a 0-d learnable `scale`."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _MMDetFCOSHead(torch.nn.Module):
    """mmdetection 2.11 `FCOSHead` names and `forward_single` (written for this test)."""

    def __init__(self, cin, num_classes, feat, stacked, groups, tricks, strides=STRIDES):
        super().__init__()
        self.cls_convs = torch.nn.ModuleList()
        self.reg_convs = torch.nn.ModuleList()
        for i in range(stacked):
            c = cin if i == 0 else feat
            self.cls_convs.append(_ConvModule(c, feat, 3, bias=tricks, groups=groups))
            self.reg_convs.append(_ConvModule(c, feat, 3, bias=tricks, groups=groups))
        self.conv_cls = torch.nn.Conv2d(feat, num_classes, 3, padding=1)
        self.conv_reg = torch.nn.Conv2d(feat, 4, 3, padding=1)
        self.conv_centerness = torch.nn.Conv2d(feat, 1, 3, padding=1)
        self.scales = torch.nn.ModuleList([_Scale() for _ in strides])
        self.strides, self.norm_on_bbox = strides, tricks

    def forward(self, feats):
        out = []
        for x, scale, stride in zip(feats, self.scales, self.strides, strict=True):
            c, r = x, x
            for m in self.cls_convs:
                c = m(c)
            for m in self.reg_convs:
                r = m(r)
            ctr = self.conv_centerness(c)  # centerness_on_reg=False in both variants
            reg = scale(self.conv_reg(r)).float()
            if self.norm_on_bbox:
                reg = F.relu(reg)
                if not self.training:
                    reg = reg * stride
            else:
                reg = reg.exp()
            out.append((self.conv_cls(c), reg, ctr))
        return out


class _MMDetFPN(torch.nn.Module):
    """mmdetection FPN names, start_level 1, 'on_output' extra convs (parameters only)."""

    def __init__(self, in_channels, out, num_outs=5):
        super().__init__()
        self.lateral_convs = torch.nn.ModuleList([_ConvModule(c, out, 1) for c in in_channels])
        self.fpn_convs = torch.nn.ModuleList(
            [
                _ConvModule(out, out, 3, stride=1 if i < len(in_channels) else 2)
                for i in range(num_outs)
            ]
        )


class _MMDetFCOS(torch.nn.Module):
    """`backbone` (mmdetection ResNet names = torchvision's without `fc`), `neck`, `bbox_head`."""

    def __init__(self, tricks: bool):
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        del self.backbone.fc
        self.neck = _MMDetFPN((128, 256, 512), 16)
        self.bbox_head = _MMDetFCOSHead(16, 3, 16, 2, 4, tricks)


@pytest.mark.parametrize("tricks", [False, True])
def test_mmdet_layout_import_export_and_head_forward(tricks):
    """An mmdetection-named FCOS (0-d `scales.i.scale`) imports strictly; our export loads
    back into it with `strict=True` (same tensors); head outputs equal within 1e-4."""
    from fgd_jax.convert import export_torch_state_dict, import_torch_checkpoint

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ref = _MMDetFCOS(tricks)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif ".gn." in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            else:
                p.normal_(0, 0.1, generator=gen)
    ref.eval()
    assert ref.state_dict()["bbox_head.scales.0.scale"].shape == ()
    cfg = _tiny_caffe_cfg(tricks=tricks)
    variables = import_torch_checkpoint(ref.state_dict(), cfg)  # strict by default
    assert variables["params"]["bbox_head"]["scales_3"]["scale"].shape == ()

    exported = export_torch_state_dict(variables, cfg)
    assert exported["bbox_head.scales.0.scale"].shape == ()
    back = _MMDetFCOS(tricks)
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()})
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    fgen = torch.Generator().manual_seed(2)
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    feats = [torch.randn(2, 16, h, w, generator=fgen) for h, w in sizes]
    with torch.no_grad():
        want = ref.bbox_head(feats)
    model = build_detector(cfg)
    got = jax.jit(lambda v, f: model.apply(v, f, method=lambda m, x: m.bbox_head(x)))(
        variables, [jnp.asarray(f.permute(0, 2, 3, 1).numpy()) for f in feats]
    )
    for lvl, (cls, reg, ctr) in enumerate(want):
        # ours keeps norm_on_bbox distances in stride units; mmdetection's eval multiplies
        scale = STRIDES[lvl] if tricks else 1.0
        _rel_close(got[0][lvl], cls.permute(0, 2, 3, 1).numpy(), 1e-4, f"cls {lvl}")
        _rel_close(got[1][lvl] * scale, reg.permute(0, 2, 3, 1).numpy(), 1e-4, f"reg {lvl}")
        _rel_close(got[2][lvl], ctr.permute(0, 2, 3, 1).numpy(), 1e-4, f"ctr {lvl}")


# ------------------------------------------------------------------ FGD training (tiny)
def _tiny_fgd_model(tricks: bool, pixel_mean=None):
    m = C.fcos_model(
        depth=18,
        num_classes=len(SHAPES_CLASS_NAMES),
        tricks=tricks,
        feat_channels=32,
        stacked_convs=1,
        fpn_channels=32,
        num_groups=8,
        frozen_stages=-1,
        pixel_mean=pixel_mean,
    )
    m.backbone.norm_eval = False  # from scratch: BN statistics must be learned
    return m


@pytest.mark.slow
def test_fgd_student_variant_trains_with_sgd_and_every_loss_part_falls(tmp_path):
    """configs/fcos_r101_r50.py at toy scale: the FGD student variant (centre sampling,
    norm_on_bbox, GIoU, tower conv bias) with caffe BGR input, a plain-FCOS teacher fed the
    student's image, FGD with the paper's FCOS hyper-parameters on all 5 levels, inheriting,
    and the SGD recipe (momentum 0.9, bias lr x2 without decay, linear warm-up from 1/3,
    clipping at 35). It runs the trainer's own `init_train_state` / `make_train_step` (the
    optimizer, inheriting, FGD losses) for 60 steps on the synthetic shapes, skipping `train`'s
    checkpoints and final eval to keep the test short, and compares the means of the first
    and the last 10 steps."""
    from fgd_jax import experiment as experiment_lib
    from fgd_jax.data import pipeline

    from ._tiny import tiny_config

    steps, n, cycle = 60, 10, 5
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=steps)
    cfg.model = _tiny_fgd_model(tricks=True)
    cfg.teacher.model = _tiny_fgd_model(tricks=False, pixel_mean=C.CAFFE_PIXEL_MEAN)
    # the FGD hyper-parameters of the real config (temp 0.8, alpha 1.6e-3, ...), tiny widths
    cfg.distill = _load("fcos_r101_r50.py").distill
    cfg.distill.student_channels = cfg.distill.teacher_channels = 32
    cfg.data.pixel_style = "caffe"
    cfg.data.num_workers = 0
    tc = cfg.train
    tc.optimizer, tc.base_lr, tc.momentum, tc.weight_decay = "sgd", 0.004, 0.9, 1e-4
    tc.bias_lr_mult, tc.bias_decay_mult, tc.grad_clip_norm = 2.0, 0.0, 35.0
    tc.warmup, tc.warmup_ratio, tc.warmup_iters = "linear", 1.0 / 3, 2
    tc.decay_steps = (steps,)
    # `cycle` fixed batches (the 16 images, flips and all), cycled: the first and the last n
    # steps see the same images twice, so their means differ by training only, not by which
    # boxes (and how much background) the batches happen to hold
    loader = pipeline.build_train_loader(cfg.data, global_batch_size=tc.batch_size, seed=0)
    batches = [next(loader) for _ in range(cycle)]
    loader.close()

    # A random teacher stands in for a trained one. Its BN statistics must still fit its
    # inputs (a trained caffe ResNet's do): with the init statistics (mean 0, var 1) the
    # eval-mode teacher passes the +-128 caffe input unnormalised, its FPN maps come out
    # ~100x too large and FGD's loss (~1e4) drowns the detector's. So: a few train-mode
    # forward passes to update the running statistics, as a trained teacher would have them.
    exp = experiment_lib.Experiment(cfg)
    teacher_vars = init_module(exp.teacher, jax.random.key(1), batches[0]["image"][:1])

    @jax.jit
    def calibrate(v, images):
        _, new = exp.teacher.apply(
            v, images, train=True, mutable=["batch_stats"], method="extract_feat"
        )
        return dict(v, batch_stats=new["batch_stats"])

    for i in range(20):  # momentum 0.1: 1 - 0.9**20 = 88% of the way
        teacher_vars = calibrate(teacher_vars, batches[i % cycle]["image"])

    state, tx, schedule = experiment_lib.init_train_state(
        exp, experiment_lib.dummy_batch(cfg.data), loader.steps_per_epoch, teacher_vars
    )
    step = jax.jit(experiment_lib.make_train_step(exp, tx, schedule))
    recs = []
    for i in range(steps):
        state, metrics = step(state, teacher_vars, batches[i % cycle])
        recs.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    assert all(np.isfinite(v) for r in recs for v in r.values())
    keys = [k for k in recs[0] if k.startswith("loss")]
    first = {k: np.mean([r[k] for r in recs[:n]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-n:]]) for k in keys}
    fgd_levels = [f"loss_fgd_fpn_{i}" for i in range(5)]
    assert {"loss_cls", "loss_bbox", "loss_centerness", *fgd_levels} <= set(keys)
    assert {f"loss_fgd_fpn_0/{p}" for p in ("fg", "bg", "mask", "relation")} <= set(keys)

    # The centerness BCE starts at ln 2 (logit 0) and cannot go below the mean entropy of its
    # soft targets (~0.58 nats here), so only ~0.11 can go in total: it must close 15% of that
    # gap (measured 23%; a plain 20% drop is out of its reach).
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    counts = [h * w for h, w in shapes]
    student = exp.student
    targets = jax.jit(
        jax.vmap(
            lambda bx, lb, ok: fc.fcos_targets(
                jnp.concatenate(student.points(shapes), 0),
                fc._per_point(student.strides, counts),
                fc._per_point(student.regress_ranges, counts),
                bx,
                lb,
                ok,
                6,
                True,
                1.5,
            )
        )
    )
    ent = []
    for b in batches:
        labels, boxes = (np.asarray(a) for a in targets(b["boxes"], b["labels"], b["valid"]))
        t = np.clip(
            np.asarray(fc.centerness_target(jnp.asarray(boxes[labels < 6]))), 1e-7, 1 - 1e-7
        )
        ent.append(np.mean(-(t * np.log(t) + (1 - t) * np.log1p(-t))))
    floor = float(np.mean(ent))
    ctr_first, ctr_last = first.pop("loss_centerness"), last.pop("loss_centerness")
    assert 0.4 < floor < ctr_last < ctr_first
    assert ctr_first - ctr_last > 0.15 * (ctr_first - floor), (ctr_first, ctr_last, floor)

    # bg on P5-P7: at 64 px every cell of those levels lies inside some GT box of these
    # batches, so there is no background and the part is exactly 0 throughout: exempt.
    zero = {k for k in first if max(r[k] for r in recs) < 1e-6}
    assert zero == {f"loss_fgd_fpn_{i}/bg" for i in (2, 3, 4)}, zero
    # Every other part (detector, each FGD level, its fg / bg / mask / relation) must fall by
    # at least 20%. Measured over 3 data seeds: cls x0.32-0.34, bbox x0.53-0.54, FGD levels
    # x0.21-0.63, their parts x0.18-0.70 (mask the slowest). Not fewer steps: in the first
    # ~40 the clipped SGD (grad norm 50-100 > 35) still thrashes, and P4's fg part can rise.
    ratios = {k: last[k] / first[k] for k in first if k not in zero and k != "loss"}
    slow = {k: round(float(r), 3) for k, r in ratios.items() if r > 0.8}
    assert not slow, slow

"""RetinaNet (fgd_jax.models.retinanet) against independent references.

References:
- anchors: a numpy transcription of mmdetection 2.11 `AnchorGenerator` (float64), atol 1e-4 px.
- head / full model: torchvision `RetinaNetHead` / `retinanet_resnet50_fpn` (random weights,
  randomized BN statistics, eval mode) converted with `fgd_jax.convert`; rel. error 1e-4.
- loss: a torch transcription of mmdetection 2.11 `AnchorHead.loss` + `MaxIoUAssigner` (IoU by
  `torchvision.ops.box_iou`, focal loss by `torchvision.ops.sigmoid_focal_loss`), 1e-5 rel.
- inference: a torch transcription of mmdetection 2.11 `AnchorHead._get_bboxes` +
  `multiclass_nms` (`torchvision.ops.batched_nms`), and torchvision's own
  `RetinaNet.postprocess_detections` on a case where the two post-processings agree
  (all anchors kept per level, fewer than `topk_candidates` pairs above the threshold).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from torchvision.models.detection import retinanet as tv_retinanet

from fgd_jax import config as C
from fgd_jax.convert import convert_state_dict, import_torch_checkpoint
from fgd_jax.convert.torchvision_retinanet import RENAME_RULES
from fgd_jax.models import build_detector, init_module
from fgd_jax.models.retinanet import (
    RetinaHead,
    RetinaNet,
    anchor_valid_flags,
    retina_anchors,
    retina_loss,
    retina_postprocess,
)

from ._tiny import overfit_batch

STRIDES = (8, 16, 32, 64, 128)


def feat_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """Conv-arithmetic feature sizes of P3..P7 (stride-2 3x3 pad-1 convs: ceil halving)."""
    out = []
    for s in STRIDES:
        out.append((math.ceil(h / s), math.ceil(w / s)))
    return out


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ------------------------------------------------------------------------------ references
def mmdet_anchors_np(shapes, strides=STRIDES, base_scale=4, per_octave=3, ratios=(0.5, 1, 2)):
    """mmdetection 2.11 AnchorGenerator(octave_base_scale, scales_per_octave, ratios, strides),
    scale_major=True, center_offset=0, in float64."""
    scales = np.array([2 ** (i / per_octave) for i in range(per_octave)]) * base_scale
    ratios = np.asarray(ratios, np.float64)
    out = []
    for (h, w), s in zip(shapes, strides, strict=True):
        h_ratios = np.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (s * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (s * h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)
        xx, yy = np.meshgrid(np.arange(w) * s, np.arange(h) * s)  # x fastest
        shifts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], axis=-1)
        out.append((shifts[:, None, :] + base[None]).reshape(-1, 4))
    return out


def mmdet_valid_flags_np(shapes, strides, num_anchors, img_hw, size_divisor=32):
    """AnchorGenerator.valid_flags with mmdet's pad_shape = img_shape padded to size_divisor."""
    pad_h = math.ceil(img_hw[0] / size_divisor) * size_divisor
    pad_w = math.ceil(img_hw[1] / size_divisor) * size_divisor
    flags = []
    for (h, w), s in zip(shapes, strides, strict=True):
        vh, vw = min(math.ceil(pad_h / s), h), min(math.ceil(pad_w / s), w)
        vy = np.zeros(h, bool)
        vx = np.zeros(w, bool)
        vy[:vh] = True
        vx[:vw] = True
        yy, xx = np.meshgrid(vy, vx, indexing="ij")
        flags.append(np.repeat((yy & xx).reshape(-1), num_anchors))
    return np.concatenate(flags)


def torch_mmdet_loss(
    cls, reg, anchors, shapes, img_shapes, gt_boxes, gt_labels, gt_valid, num_classes, group=0
):
    """mmdetection 2.11 RetinaHead loss (AnchorHead.loss, MaxIoUAssigner pos 0.5 / neg 0.4 /
    min_pos_iou 0 / gt_max_assign_all, FocalLoss gamma 2 alpha 0.25, L1Loss), in torch."""
    cls = torch.as_tensor(np.asarray(cls), dtype=torch.float64)
    reg = torch.as_tensor(np.asarray(reg), dtype=torch.float64)
    anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.float64)
    b = cls.shape[0]
    cls_sum, bbox_sum, npos = [], [], []
    for i in range(b):
        inside = torch.as_tensor(mmdet_valid_flags_np(shapes, STRIDES, 9, img_shapes[i]))
        gts = torch.as_tensor(np.asarray(gt_boxes[i])[np.asarray(gt_valid[i])], dtype=torch.float64)
        gls = torch.as_tensor(np.asarray(gt_labels[i])[np.asarray(gt_valid[i])]).long()
        a = anchors[inside]
        n = a.shape[0]
        assigned = torch.full((n,), -1, dtype=torch.long)
        if gts.shape[0] == 0:
            assigned[:] = 0
        else:
            overlaps = torchvision.ops.box_iou(gts.float(), a.float())  # [G, n], fp32 as mmdet
            max_ov, argmax_ov = overlaps.max(dim=0)
            gt_max_ov, _ = overlaps.max(dim=1)
            assigned[(max_ov >= 0) & (max_ov < 0.4)] = 0
            pos = max_ov >= 0.5
            assigned[pos] = argmax_ov[pos] + 1
            for g in range(gts.shape[0]):
                if gt_max_ov[g] >= 0.0:
                    assigned[overlaps[g] == gt_max_ov[g]] = g + 1
        labels = torch.full((n,), num_classes, dtype=torch.long)
        pos = assigned > 0
        labels[pos] = gls[assigned[pos] - 1]
        lw = (assigned >= 0).double()
        tgt = torch.zeros((n, 4), dtype=torch.float64)
        if pos.any():
            p, g = a[pos], gts[assigned[pos] - 1]
            px, py = (p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2
            pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
            gx, gy = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2
            gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
            tgt[pos] = torch.stack(
                [(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], -1
            )
        onehot = torch.nn.functional.one_hot(labels, num_classes + 1)[:, :num_classes].double()
        fl = torchvision.ops.sigmoid_focal_loss(
            cls[i][inside], onehot, alpha=0.25, gamma=2.0, reduction="none"
        )
        cls_sum.append((fl * lw[:, None]).sum())
        bbox_sum.append(((reg[i][inside] - tgt).abs() * pos[:, None].double()).sum())
        npos.append(max(int(pos.sum()), 1))
    g = b if group <= 0 else group
    lc, lb = [], []
    for s in range(0, b, g):
        den = sum(npos[s : s + g])
        lc.append(sum(cls_sum[s : s + g]) / den)
        lb.append(sum(bbox_sum[s : s + g]) / den)
    return float(sum(lc) / len(lc)), float(sum(lb) / len(lb))


def torch_mmdet_get_bboxes(cls_levels, reg_levels, anchor_levels, img_hw, scale_factor, cfg):
    """mmdetection 2.11 AnchorHead._get_bboxes (sigmoid, rescale=True) + multiclass_nms for one
    image; inputs per level [H*W*A, C] logits, [H*W*A, 4] deltas, [H*W*A, 4] anchors. Computes
    in the dtype of the deltas (anchors and scale factor cast to it)."""
    max_ratio = abs(math.log(16 / 1000))
    boxes_all, scores_all = [], []
    for cls, reg, anc in zip(cls_levels, reg_levels, anchor_levels, strict=True):
        scores = torch.sigmoid(torch.as_tensor(np.asarray(cls)))
        reg = torch.as_tensor(np.asarray(reg))
        anc = torch.as_tensor(np.asarray(anc), dtype=reg.dtype)
        if 0 < cfg["nms_pre"] < scores.shape[0]:
            _, topk = scores.max(-1)[0].topk(cfg["nms_pre"])
            scores, reg, anc = scores[topk], reg[topk], anc[topk]
        px, py = (anc[:, 0] + anc[:, 2]) * 0.5, (anc[:, 1] + anc[:, 3]) * 0.5
        pw, ph = anc[:, 2] - anc[:, 0], anc[:, 3] - anc[:, 1]
        dw = reg[:, 2].clamp(-max_ratio, max_ratio)
        dh = reg[:, 3].clamp(-max_ratio, max_ratio)
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * reg[:, 0], py + ph * reg[:, 1]
        x1 = (gx - gw * 0.5).clamp(0, img_hw[1])
        y1 = (gy - gh * 0.5).clamp(0, img_hw[0])
        x2 = (gx + gw * 0.5).clamp(0, img_hw[1])
        y2 = (gy + gh * 0.5).clamp(0, img_hw[0])
        boxes_all.append(torch.stack([x1, y1, x2, y2], -1))
        scores_all.append(scores)
    boxes = torch.cat(boxes_all)
    boxes = boxes / torch.as_tensor(np.asarray(scale_factor), dtype=boxes.dtype)
    scores = torch.cat(scores_all)
    num_classes = scores.shape[1]
    boxes = boxes[:, None, :].expand(-1, num_classes, 4)
    labels = torch.arange(num_classes)[None].expand_as(scores)
    keep = scores > cfg["score_thr"]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    kept = torchvision.ops.batched_nms(boxes, scores, labels, cfg["iou_threshold"])
    kept = kept[: cfg["max_per_img"]]
    return boxes[kept].numpy(), scores[kept].numpy(), labels[kept].numpy()


def check_detections(
    ours: dict,
    i: int,
    ref_boxes,
    ref_scores,
    ref_labels,
    score_rtol: float = 1e-5,
    box_rtol: float = 1e-5,
    box_atol: float = 1e-3,
) -> None:
    valid = np.asarray(ours["valid"][i])
    n = int(valid.sum())
    assert n == len(ref_scores), (n, len(ref_scores))
    assert n > 10  # a meaningful number of detections
    assert valid[:n].all() and not valid[n:].any()
    np.testing.assert_allclose(np.asarray(ours["scores"][i][:n]), ref_scores, rtol=score_rtol)
    np.testing.assert_array_equal(np.asarray(ours["labels"][i][:n]), ref_labels)
    np.testing.assert_allclose(
        np.asarray(ours["boxes"][i][:n]), ref_boxes, rtol=box_rtol, atol=box_atol
    )


# ----------------------------------------------------------------------------------- tests
def test_anchors_match_mmdet_anchor_generator():
    shapes = feat_shapes(100, 152)  # odd sizes: (13, 19), (7, 10), (4, 5), (2, 3), (1, 2)
    ours = retina_anchors(shapes)
    ref = mmdet_anchors_np(shapes)
    assert len(ours) == 5
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape and o.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-6, atol=1e-4)
    # spot check of mmdetection's well-known P3 base anchors (ratio 0.5, scale 4): w 45.25
    np.testing.assert_allclose(
        np.asarray(ours[0][0]), [-22.627417, -11.313708, 22.627417, 11.313708]
    )


def test_anchor_valid_flags_match_mmdet():
    shapes = feat_shapes(128, 160)
    img_shapes = np.array([[60, 90], [128, 100]], np.int32)
    ours = np.asarray(anchor_valid_flags(shapes, STRIDES, 9, img_shapes, 32))
    for i in range(2):
        np.testing.assert_array_equal(
            ours[i], mmdet_valid_flags_np(shapes, STRIDES, 9, img_shapes[i])
        )
    assert not ours[0].all() and ours[0].any()


def test_head_matches_torchvision_head():
    torch.manual_seed(0)
    num_classes, ch = 4, 16
    tv_head = tv_retinanet.RetinaNetHead(ch, 9, num_classes).eval()
    with torch.no_grad():
        for p in tv_head.parameters():
            p.normal_(0, 0.1)
    feats_t = [torch.randn(2, ch, h, w) for h, w in feat_shapes(64, 96)]
    with torch.no_grad():
        tv_cls = [
            tv_head.classification_head.cls_logits(_tower(tv_head.classification_head.conv, f))
            for f in feats_t
        ]
        tv_reg = [
            tv_head.regression_head.bbox_reg(_tower(tv_head.regression_head.conv, f))
            for f in feats_t
        ]
        tv_out = tv_head(feats_t)  # flattened [N, sum HWA, K] / [N, sum HWA, 4]

    head = RetinaHead(num_classes=num_classes, num_anchors=9, feat_channels=ch)
    feats = [jnp.asarray(f.permute(0, 2, 3, 1).numpy()) for f in feats_t]
    target = {
        "params": {"bbox_head": jax.eval_shape(head.init, jax.random.key(0), feats)["params"]}
    }
    sd = {"head." + k: v for k, v in tv_head.state_dict().items()}
    variables = convert_state_dict(sd, target, rename=RENAME_RULES)
    cls, reg = head.apply({"params": variables["params"]["bbox_head"]}, feats)
    for o, r in zip(cls, tv_cls, strict=True):
        assert rel_err(o, r.permute(0, 2, 3, 1).numpy()) < 1e-5
    for o, r in zip(reg, tv_reg, strict=True):
        assert rel_err(o, r.permute(0, 2, 3, 1).numpy()) < 1e-5
    # same flattening (anchor index (y*W+x)*A+a, class channel a*C+c) as torchvision's head
    flat_cls = np.concatenate([np.asarray(c).reshape(2, -1, num_classes) for c in cls], 1)
    flat_reg = np.concatenate([np.asarray(r).reshape(2, -1, 4) for r in reg], 1)
    assert rel_err(flat_cls, tv_out["cls_logits"].numpy()) < 1e-5
    assert rel_err(flat_reg, tv_out["bbox_regression"].numpy()) < 1e-5


def _tower(seq, x):
    for m in seq:
        x = m(x)
    return x


def test_head_init_follows_mmdet():
    head = RetinaHead(num_classes=3, num_anchors=9, feat_channels=32)
    feats = [jnp.zeros((1, 8, 8, 32))]
    params = init_module(head, jax.random.key(0), feats)["params"]
    assert set(params) == {f"cls_convs_{i}" for i in range(4)} | {
        f"reg_convs_{i}" for i in range(4)
    } | {"retina_cls", "retina_reg"}
    bias = np.asarray(params["retina_cls"]["bias"])
    np.testing.assert_allclose(bias, -math.log(0.99 / 0.01), rtol=1e-6)
    k = np.asarray(params["cls_convs_0"]["conv"]["kernel"])
    assert abs(k.std() - 0.01) < 0.001 and params["retina_reg"]["kernel"].shape == (3, 3, 32, 36)


def _loss_inputs(seed: int, num_classes: int = 3, zero_gt: bool = False):
    rng = np.random.default_rng(seed)
    h, w = 128, 160
    shapes = feat_shapes(h, w)
    anchors = np.concatenate([np.asarray(a) for a in retina_anchors(shapes)])
    b, g = 4, 6
    cls = rng.normal(-2.0, 1.5, (b, anchors.shape[0], num_classes)).astype(np.float32)
    reg = rng.normal(0.0, 0.5, (b, anchors.shape[0], 4)).astype(np.float32)
    img_shapes = np.array([[60, 90], [128, 160], [100, 130], [128, 70]], np.int32)
    boxes = np.zeros((b, g, 4), np.float32)
    labels = np.full((b, g), -1, np.int32)
    valid = np.zeros((b, g), bool)
    for i in range(b):
        n = 0 if zero_gt else [3, 6, 1, 0][i]
        ih, iw = img_shapes[i]
        for j in range(n):
            bw, bh = rng.uniform(12, min(iw, 80)), rng.uniform(12, min(ih, 80))
            x1, y1 = rng.uniform(0, iw - bw), rng.uniform(0, ih - bh)
            boxes[i, j] = [x1, y1, x1 + bw, y1 + bh]
            labels[i, j] = rng.integers(num_classes)
            valid[i, j] = True
        # a padded slot with a plausible box: must never be matched
        if n < g:
            boxes[i, n] = [10, 10, 60, 50]
            labels[i, n] = 0
    return cls, reg, anchors, shapes, img_shapes, boxes, labels, valid


@pytest.mark.parametrize("group", [0, 2])
def test_loss_matches_torch_mmdet_transcription(group):
    num_classes = 3
    cls, reg, anchors, shapes, img_shapes, boxes, labels, valid = _loss_inputs(1, num_classes)
    flags = anchor_valid_flags(shapes, STRIDES, 9, img_shapes, 32)
    fn = jax.jit(
        lambda c, r, f, b, l, v: retina_loss(
            c, r, jnp.asarray(anchors), f, b, l, v, num_classes, loss_norm_group=group
        )
    )
    ours = fn(cls, reg, flags, boxes, labels, valid)
    ref_cls, ref_bbox = torch_mmdet_loss(
        cls, reg, anchors, shapes, img_shapes, boxes, labels, valid, num_classes, group
    )
    assert ref_bbox > 0
    np.testing.assert_allclose(float(ours["loss_cls"]), ref_cls, rtol=1e-5)
    np.testing.assert_allclose(float(ours["loss_bbox"]), ref_bbox, rtol=1e-5)


def test_loss_matches_torch_mmdet_transcription_in_float64():
    """Under x64 with float64 logits, deltas and GT boxes the loss is computed in float64
    (targets, focal, L1, normalisation) and equals the float64 torch transcription to 1e-10
    (in float32 the same comparison is bounded by float32 rounding, 1e-5 above)."""
    num_classes = 3
    cls, reg, anchors, shapes, img_shapes, boxes, labels, valid = _loss_inputs(1, num_classes)
    cls, reg, boxes = (x.astype(np.float64) for x in (cls, reg, boxes))
    with jax.enable_x64(True):
        flags = anchor_valid_flags(shapes, STRIDES, 9, img_shapes, 32)
        ours = jax.jit(
            lambda c, r, f, b, l, v: retina_loss(
                c, r, jnp.asarray(anchors), f, b, l, v, num_classes, loss_norm_group=2
            )
        )(cls, reg, flags, boxes, labels, valid)
        assert all(v.dtype == jnp.float64 for v in ours.values())
    ref_cls, ref_bbox = torch_mmdet_loss(
        cls, reg, anchors, shapes, img_shapes, boxes, labels, valid, num_classes, 2
    )
    assert ref_bbox > 0
    np.testing.assert_allclose(float(ours["loss_cls"]), ref_cls, rtol=1e-10)
    np.testing.assert_allclose(float(ours["loss_bbox"]), ref_bbox, rtol=1e-10)


def test_zero_gt_and_padded_gt_never_matched():
    num_classes = 3
    cls, reg, anchors, shapes, img_shapes, boxes, labels, valid = _loss_inputs(
        2, num_classes, zero_gt=True
    )
    flags = anchor_valid_flags(shapes, STRIDES, 9, img_shapes, 32)
    ours = jax.jit(
        lambda c, r: retina_loss(c, r, jnp.asarray(anchors), flags, boxes, labels, valid, 3)
    )(cls, reg)
    assert float(ours["loss_bbox"]) == 0.0
    # every valid anchor negative: focal loss with all-zero targets, normalised by B * 1
    ref = torchvision.ops.sigmoid_focal_loss(
        torch.as_tensor(cls, dtype=torch.float64),
        torch.zeros(cls.shape, dtype=torch.float64),
        reduction="none",
    )
    ref = (ref * torch.tensor(np.asarray(flags))[..., None]).sum() / cls.shape[0]
    assert np.isfinite(float(ours["loss_cls"]))
    np.testing.assert_allclose(float(ours["loss_cls"]), float(ref), rtol=1e-5)
    grads = jax.jit(
        jax.grad(
            lambda c, r: sum(
                retina_loss(c, r, jnp.asarray(anchors), flags, boxes, labels, valid, 3).values()
            ),
            argnums=(0, 1),
        )
    )(jnp.asarray(cls), jnp.asarray(reg))
    assert all(bool(jnp.isfinite(x).all()) for x in grads)
    assert float(jnp.abs(grads[1]).max()) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_postprocess_matches_mmdet_get_bboxes(dtype):
    """float32: scores 1e-5, boxes 1e-5 / 1e-3 px. float64 (x64, float64 logits / deltas /
    scale factors): every output is float64 and scores and boxes agree to 1e-10."""
    rng = np.random.default_rng(3)
    num_classes, b = 4, 2
    shapes = feat_shapes(128, 160)
    anchors = retina_anchors(shapes)
    cls = [rng.normal(-3.5, 1.5, (b, h, w, 9 * num_classes)).astype(dtype) for h, w in shapes]
    reg = [rng.normal(0, 0.4, (b, h, w, 36)).astype(dtype) for h, w in shapes]
    img_shape = np.array([[120, 150], [100, 160]], np.int32)
    scale_factor = np.array([[1.5, 1.25, 1.5, 1.25], [0.5, 0.5, 0.5, 0.5]], dtype)
    cfg = dict(nms_pre=300, score_thr=0.05, iou_threshold=0.5, max_per_img=100)
    with jax.enable_x64(dtype == np.float64):
        ours = jax.jit(
            lambda c, r: retina_postprocess(
                c, r, anchors, img_shape, scale_factor, num_classes, max_candidates=4000, **cfg
            )
        )(cls, reg)
    assert ours["scores"].dtype == ours["boxes"].dtype == dtype
    tol = dict(score_rtol=1e-10, box_rtol=1e-10, box_atol=1e-9) if dtype == np.float64 else {}
    for i in range(b):
        ref = torch_mmdet_get_bboxes(
            [c[i].reshape(-1, num_classes) for c in cls],
            [r[i].reshape(-1, 4) for r in reg],
            [np.asarray(a) for a in anchors],
            img_shape[i],
            scale_factor[i],
            cfg,
        )
        assert len(ref[1]) == 100
        check_detections(ours, i, *ref, **tol)


def _tv_randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.slow
def test_full_model_matches_torchvision_retinanet():
    torch.manual_seed(0)
    num_classes = 5
    tv = tv_retinanet.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes
    ).eval()
    _tv_randomize(tv, 0)
    with torch.no_grad():  # spread the logits: a few hundred (anchor, class) pairs pass 0.05
        for name, p in tv.head.named_parameters():
            if name.endswith("weight"):
                p.normal_(0, 0.03)
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.005)
        tv.head.classification_head.cls_logits.bias.fill_(-5.5)

    cfg = C.retinanet_model(depth=50, num_classes=num_classes)
    cfg.neck.add_extra_convs = "on_output"  # torchvision LastLevelP6P7(256, 256): P6 from P5
    cfg.neck.relu_before_extra_convs = True  # and ReLU before P7
    cfg.test_cfg.nms_pre = 100000  # keep every anchor, as torchvision does before thresholding
    model = build_detector(cfg)
    assert isinstance(model, RetinaNet)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)

    h, w = 128, 256  # multiples of 128: torchvision's strides are then 8..128 too
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats_t = list(tv.backbone(x).values())
        head_t = tv.head(feats_t)
    outs = jax.jit(lambda v, im: model.apply(v, im))(
        variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    )
    for o, r in zip(outs["features"], feats_t, strict=True):
        assert rel_err(o, r.permute(0, 2, 3, 1).numpy()) < 1e-4
    flat_cls = np.concatenate(
        [np.asarray(c).reshape(1, -1, num_classes) for c in outs["cls_scores"]], 1
    )
    flat_reg = np.concatenate([np.asarray(r).reshape(1, -1, 4) for r in outs["bbox_preds"]], 1)
    assert rel_err(flat_cls, head_t["cls_logits"].numpy()) < 1e-4
    assert rel_err(flat_reg, head_t["bbox_regression"].numpy()) < 1e-4

    # Detections: torchvision's postprocess_detections with OUR (mmdetection) anchors, since
    # torchvision's own anchors are rounded integer sizes (see convert/torchvision_retinanet).
    shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
    anchors = [torch.tensor(np.asarray(a)) for a in model.anchors(shapes)]
    sizes = [a.shape[0] for a in anchors]
    split = {k: list(v.split(sizes, dim=1)) for k, v in head_t.items()}
    tv.score_thresh, tv.nms_thresh, tv.detections_per_img = 0.05, 0.5, 100
    with torch.no_grad():
        det_t = tv.postprocess_detections(split, [anchors], [(h, w)])[0]
    assert max(int((torch.sigmoid(c) > 0.05).sum()) for c in split["cls_logits"]) < 1000
    det = jax.jit(
        lambda v, im: model.apply(v, im, np.array([[h, w]]), np.ones((1, 4)), method="predict")
    )(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    # The scores are sigmoids of logits asserted above to 1e-4 relative (float32 noise of two
    # ResNet-50 + FPN + head implementations): comparing them at 1e-5 measured the CPU's rounding
    # (passed on an Intel Xeon, 1.07e-5 on an AMD EPYC), so they get the logits' tolerance.
    # Post-processing alone, on identical inputs, keeps 1e-5 (test above).
    check_detections(
        det,
        0,
        det_t["boxes"].numpy(),
        det_t["scores"].numpy(),
        det_t["labels"].numpy(),
        score_rtol=1e-4,
    )


def _tiny_cfg(num_classes: int = 3):
    cfg = C.retinanet_model(
        depth=18, num_classes=num_classes, feat_channels=64, fpn_channels=64, stacked_convs=2
    )
    return cfg


def test_from_config_shapes_and_names():
    cfg = _tiny_cfg()
    model = build_detector(cfg)
    images = jnp.zeros((2, 64, 96, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    assert set(shapes["params"]) == {"backbone", "neck", "bbox_head"}
    assert "cls_convs_1" in shapes["params"]["bbox_head"]
    out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes, images)
    assert [c.shape for c in out["cls_scores"]] == [(2, h, w, 27) for h, w in feat_shapes(64, 96)]
    assert [r.shape[-1] for r in out["bbox_preds"]] == [36] * 5
    assert len(out["features"]) == 5
    cfg.neck.num_outs = 4  # one FPN level fewer than the head's 5 strides
    with pytest.raises(ValueError, match=r"retinanet model config: neck.num_outs 4 != 5"):
        RetinaNet.from_config(cfg)
    cfg.neck.num_outs = 5
    with pytest.raises(ValueError, match="missing key 'head'"):
        del cfg["head"]
        RetinaNet.from_config(cfg)


@pytest.mark.slow
def test_overfits_one_small_batch():
    cfg = _tiny_cfg()
    cfg.backbone.frozen_stages = 4  # ResNet-18 frozen (features still random): keeps it fast
    model = build_detector(cfg)
    batch = overfit_batch()
    variables = init_module(model, jax.random.key(0), batch["image"])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    def loss_fn(p):
        losses, _ = model.apply(
            {"params": p, "batch_stats": stats}, batch, method=RetinaNet.forward_train
        )
        return losses["loss_cls"] + losses["loss_bbox"]

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    first = None
    for _ in range(80):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    last = float(loss_fn(params))
    assert np.isfinite(last) and last < 0.1 * first, (first, last)
    det = jax.jit(
        lambda p, im: model.apply(
            {"params": p, "batch_stats": stats},
            im,
            batch["img_shape"],
            batch["scale_factor"],
            method=RetinaNet.predict,
        )
    )(params, batch["image"])
    # the top detection of image 1 is its single GT box
    assert bool(det["valid"][1, 0]) and int(det["labels"][1, 0]) == 1
    iou = torchvision.ops.box_iou(
        torch.as_tensor(np.asarray(det["boxes"][1, :1])), torch.tensor([[10.0, 10, 50, 36]])
    )
    assert float(iou) > 0.7

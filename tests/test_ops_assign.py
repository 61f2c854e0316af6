"""Parity of fgd_jax.ops.assign.max_iou_assign.

References:
- `_mmdet_assign`: a loop-based numpy transcription of mmdetection 2.x
  `MaxIoUAssigner.assign` / `assign_wrt_overlaps` (incl. ignore boxes, gt_max_assign_all False),
  run on the *unpadded* GT list; our output on the padded GT list must be identical (exact ints,
  max_overlaps to 1e-6).
- torchvision `Matcher(0.5, 0.4, allow_low_quality_matches=True)`: same encoding (-1 below
  0.4, -2 between) and thresholds, but its low-quality rule gives a low-quality anchor its
  *own argmax* GT, while mmdet gives it GT i (the last GT whose max IoU it attains). So we check:
  identical everywhere except those anchors where mmdet's low-quality GT differs from the
  argmax, and there Matcher returns the argmax while we return the mmdet GT.
"""

import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher

from fgd_jax.ops import assign as AS


def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    aa = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    ab = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(aa[:, None] + ab[None] - inter, 1e-6)


def _np_iof(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    aa = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return wh[..., 0] * wh[..., 1] / np.maximum(aa[:, None], 1e-6)


def _mmdet_assign(bboxes, gts, pos, neg, min_pos, low_q=True, assign_all=True, ign=None, ithr=-1):
    """mmdet MaxIoUAssigner (2.x) in numpy; returns mmdet encoding gt_inds (k+1 / 0 / -1)."""
    n, g = len(bboxes), len(gts)
    if g == 0:
        return np.zeros(n, np.int64), np.zeros(n, np.float32)
    overlaps = _np_iou(gts, bboxes).astype(np.float32)  # [G, N]
    if ign is not None and len(ign) and ithr > 0:
        ign_max = _np_iof(bboxes, ign).max(axis=1)
        overlaps[:, ign_max > ithr] = -1
    gt_inds = np.full(n, -1, np.int64)
    max_ov, argmax_ov = overlaps.max(0), overlaps.argmax(0)
    gt_max, gt_argmax = overlaps.max(1), overlaps.argmax(1)
    if isinstance(neg, tuple):
        gt_inds[(max_ov >= neg[0]) & (max_ov < neg[1])] = 0
    else:
        gt_inds[(max_ov >= 0) & (max_ov < neg)] = 0
    p = max_ov >= pos
    gt_inds[p] = argmax_ov[p] + 1
    if low_q:
        for i in range(g):
            if gt_max[i] >= min_pos:
                if assign_all:
                    gt_inds[overlaps[i] == gt_max[i]] = i + 1
                else:
                    gt_inds[gt_argmax[i]] = i + 1
    return gt_inds, max_ov


def _scene(seed, n=300, g=6):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (n, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(4, 30, (n, 2))], 1).astype(np.float32)
    gxy = rng.uniform(0, 80, (g, 2))
    gts = np.concatenate([gxy, gxy + rng.uniform(5, 40, (g, 2))], 1).astype(np.float32)
    gts[1] = gts[0]  # duplicate GT: ties, the later GT must win the low-quality match
    anchors[7] = anchors[8]  # duplicate anchors: both attain a GT's max
    gts[2] = anchors[7]
    anchors[10] = gts[3]
    return anchors, gts


def _pad(gts, G=10):
    out = np.zeros((G, 4), np.float32)
    out[: len(gts)] = gts
    # padded entries that would match strongly if they were counted
    out[len(gts) :] = gts[0] if len(gts) else [0, 0, 50, 50]
    valid = np.arange(G) < len(gts)
    return out, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(pos=0.5, neg=0.4, min_pos=0.0),  # RetinaNet
        dict(pos=0.7, neg=0.3, min_pos=0.3),  # RPN
        dict(pos=0.5, neg=(0.1, 0.5), min_pos=0.5, low_q=False),  # RCNN-like, tuple neg
        dict(pos=0.5, neg=0.4, min_pos=0.1, assign_all=False),
    ],
)
def test_matches_mmdet_loop_transcription(seed, cfg):
    anchors, gts = _scene(seed)
    ref, ref_max = _mmdet_assign(anchors, gts, **cfg)
    gpad, gvalid = _pad(gts)
    got, got_max = AS.max_iou_assign(
        anchors,
        gpad,
        gvalid,
        cfg["pos"],
        cfg["neg"],
        cfg["min_pos"],
        match_low_quality=cfg.get("low_q", True),
        gt_max_assign_all=cfg.get("assign_all", True),
    )
    np.testing.assert_array_equal(np.asarray(AS.to_mmdet_encoding(got)), ref)
    np.testing.assert_allclose(np.asarray(got_max), ref_max, atol=1e-6)
    assert np.asarray(got).max() < len(gts)  # padded GT never matched
    assert (np.asarray(got) >= 0).sum() > 0


def test_ignore_boxes_and_anchor_valid():
    anchors, gts = _scene(5)
    ign = np.array([[0, 0, 40, 40], [60, 60, 90, 90], [0, 0, 1, 1]], np.float32)
    ref, _ = _mmdet_assign(anchors, gts, 0.5, 0.4, 0.0, ign=ign[:2], ithr=0.5)
    gpad, gvalid = _pad(gts)
    got, _ = AS.max_iou_assign(
        anchors,
        gpad,
        gvalid,
        0.5,
        0.4,
        0.0,
        ignore_boxes=ign,
        ignore_valid=np.array([True, True, False]),
        ignore_iof_thr=0.5,
    )
    np.testing.assert_array_equal(np.asarray(AS.to_mmdet_encoding(got)), ref)
    assert (np.asarray(got) == AS.IGNORE).sum() > (ref == -1).sum() - 1 > 0
    # anchor_valid: same as running mmdet on the inside anchors only (mmdet anchor_inside_flags)
    inside = (anchors[:, 2] < 90) & (anchors[:, 0] > 5)
    ref_in, _ = _mmdet_assign(anchors[inside], gts, 0.5, 0.4, 0.0)
    got_in, _ = AS.max_iou_assign(anchors, gpad, gvalid, 0.5, 0.4, 0.0, anchor_valid=inside)
    got_in = np.asarray(AS.to_mmdet_encoding(got_in))
    np.testing.assert_array_equal(got_in[inside], ref_in)
    assert (got_in[~inside] == -1).all()


def test_no_gt_and_batched_vmap_jit():
    anchors, gts = _scene(3)
    gpad, _ = _pad(gts)
    none_valid = np.zeros(10, bool)
    got, mx = AS.max_iou_assign(anchors, gpad, none_valid, 0.5, 0.4, 0.0)
    assert (np.asarray(got) == AS.NEGATIVE).all() and (np.asarray(mx) == 0).all()
    got0, _ = AS.max_iou_assign(anchors, np.zeros((0, 4), np.float32), np.zeros(0, bool), 0.5, 0.4)
    assert (np.asarray(got0) == AS.NEGATIVE).all()
    # batch of 2 images, the second with only 2 GTs, under jit
    gpad2, gvalid2 = _pad(gts[:2])
    fn = jax.jit(lambda a, g, v: AS.batched_max_iou_assign(a, g, v, 0.5, 0.4, 0.0))
    b_assigned, _ = fn(anchors, np.stack([gpad, gpad2]), np.stack([_pad(gts)[1], gvalid2]))
    for i, gg in enumerate([gts, gts[:2]]):
        ref, _ = _mmdet_assign(anchors, gg, 0.5, 0.4, 0.0)
        np.testing.assert_array_equal(np.asarray(AS.to_mmdet_encoding(b_assigned[i])), ref)
    with pytest.raises(ValueError, match="max_iou_assign"):
        AS.max_iou_assign(anchors, gpad[None], np.ones((1, 10), bool), 0.5, 0.4)


def test_vs_torchvision_matcher():
    n_differ = 0
    for seed in range(4):
        anchors, gts = _scene(seed)
        iou = _np_iou(gts, anchors).astype(np.float32)
        tv = Matcher(0.5, 0.4, allow_low_quality_matches=True)(torch.from_numpy(iou)).numpy()
        gpad, gvalid = _pad(gts)
        got = np.asarray(AS.max_iou_assign(anchors, gpad, gvalid, 0.5, 0.4, 0.0)[0])
        argmax = iou.argmax(0)
        differ = got != tv
        # Where they differ: a low-quality match to a GT that is not the anchor's argmax.
        assert (tv[differ] == argmax[differ]).all()
        assert (got[differ] >= 0).all() and (got[differ] != argmax[differ]).all()
        lowq = (iou == iou.max(1, keepdims=True)).any(0)
        assert lowq[differ].all()
        assert (got[~differ] == tv[~differ]).all() and (~differ).sum() > 250
        n_differ += differ.sum()
    assert n_differ > 0  # the duplicated GT makes the two rules disagree somewhere


def test_point_assign_rules():
    """RepPoints' PointAssigner (mmdetection 2.x rules, checked against real mmdetection in
    tests/test_reppoints.py) on a hand-made case: level from the GT size (clamped), the nearest
    point of that level, a later GT takes a point only when strictly nearer, padded GTs and
    invalid points never assigned, no GT -> all negative."""
    from fgd_jax.models import INIT_COMPILER_OPTIONS

    # one compile (XLA optimization level 0) for every call below
    assign = jax.jit(AS.point_assign, compiler_options=INIT_COMPILER_OPTIONS)
    every = np.ones(6, bool)

    # level 3 (stride 8): x = 0, 8, 16, 24 at y = 0; level 4 (stride 16): x = 0, 16 at y = 0
    points = np.asarray([[0, 0], [8, 0], [16, 0], [24, 0], [0, 0], [16, 0]], np.float32)
    strides = np.asarray([8, 8, 8, 8, 16, 16], np.float32)
    gt = np.asarray(
        [
            [5.0, -2.0, 9.0, 2.0],  # 4x4 -> level 0 -> clamped to 3; centre (7, 0): point 1
            [6.0, -2.0, 12.0, 2.0],  # 6x4 -> 3; centre (9, 0): point 1 at 1/6 < 1/4: takes it
            [0.0, -32.0, 64.0, 32.0],  # 64x64 -> level 4; centre (32, 0): point 5
            [14.0, -2.0, 18.0, 2.0],  # padded
        ]
    )
    valid = np.asarray([True, True, True, False])
    got = assign(points, strides, gt, valid, point_valid=every)
    np.testing.assert_array_equal(got, [-1, 1, -1, -1, -1, 2])
    # GT 1 first: GT 0 (distance 2 / 8 = 0.25) is not nearer than GT 1's 1/6 -> stays
    got = assign(points, strides, gt[np.asarray([1, 0, 2, 3])], valid, point_valid=every)
    np.testing.assert_array_equal(got, [-1, 0, -1, -1, -1, 2])
    # point 1 invalid: GT 0 and 1 take the nearest valid point of their level
    pv = np.asarray([True, False, True, True, True, True])
    got = assign(points, strides, gt, valid, point_valid=pv)
    np.testing.assert_array_equal(got, [0, -2, 1, -1, -1, 2])
    got = assign(points, strides, gt, np.zeros(4, bool), point_valid=pv)
    np.testing.assert_array_equal(got, [-1, -2, -1, -1, -1, -1])

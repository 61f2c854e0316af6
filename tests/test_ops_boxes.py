"""Parity of fgd_jax.ops.boxes.

References: torchvision.ops.box_iou / generalized_box_iou, torchvision's detection BoxCoder
(weights = 1/stds), and numpy transcriptions of mmdetection 2.x `bbox_overlaps` (iof mode, eps
clamp), `delta2bbox` (means/stds, clipping to max_shape) and `distance2bbox`/`bbox2distance`.
Tolerance: fp32, 1e-5 relative / 1e-4 absolute on pixel values.
"""

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from fgd_jax.ops import boxes as B


def _rand_boxes(rng, n, size=100.0, min_wh=1.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_box_iou_vs_torchvision_and_batched():
    rng = np.random.default_rng(0)
    a, b = _rand_boxes(rng, 13), _rand_boxes(rng, 7)
    b[0] = a[0]  # identical box -> IoU exactly 1
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(B.box_iou(a, b))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert got[0, 0] == pytest.approx(1.0)
    # batched leading dim
    a2, b2 = np.stack([a, a[::-1]]), np.stack([b, b[::-1]])
    got2 = np.asarray(B.box_iou(a2, b2))
    np.testing.assert_allclose(got2[1], got[::-1, ::-1], rtol=1e-6)


def test_giou_vs_torchvision():
    rng = np.random.default_rng(1)
    a, b = _rand_boxes(rng, 9), _rand_boxes(rng, 11)
    ref = torchvision.ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(np.asarray(B.giou(a, b)), ref, rtol=1e-5, atol=1e-6)
    al = np.asarray(B.box_iou_aligned(a[:9], b[:9], mode="giou"))
    np.testing.assert_allclose(al, np.diag(ref[:, :9]), rtol=1e-5, atol=1e-6)


def _np_overlaps(a, b, mode, eps=1e-6):
    """mmdetection bbox_overlaps (is_aligned=False) transcribed with loops."""
    out = np.zeros((len(a), len(b)), np.float64)
    for i, p in enumerate(a.astype(np.float64)):
        for j, q in enumerate(b.astype(np.float64)):
            w = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
            h = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
            inter = w * h
            ap = (p[2] - p[0]) * (p[3] - p[1])
            aq = (q[2] - q[0]) * (q[3] - q[1])
            union = ap if mode == "iof" else ap + aq - inter
            out[i, j] = inter / max(union, eps)
    return out


def test_iof_and_degenerate_vs_numpy_mmdet():
    rng = np.random.default_rng(2)
    a, b = _rand_boxes(rng, 6), _rand_boxes(rng, 5)
    a[1] = [10, 10, 10, 20]  # zero-area box: union clamps to eps, IoU 0 (no nan)
    b[2] = [5, 5, 5, 5]
    for mode in ("iou", "iof"):
        got = np.asarray(B.box_iou(a, b, mode=mode))
        np.testing.assert_allclose(got, _np_overlaps(a, b, mode), rtol=1e-5, atol=1e-7)
        assert np.isfinite(got).all()
    al = np.asarray(B.box_iou_aligned(a[:5], b, mode="iof"))
    np.testing.assert_allclose(al, np.diag(_np_overlaps(a[:5], b, "iof")), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown overlap mode"):
        B.box_iou(a, b, mode="dice")


def _np_delta2bbox(rois, deltas, means, stds, max_shape, wh_ratio_clip=16 / 1000):
    """mmdetection 2.x delta2bbox transcribed in numpy (float64, K = 1)."""
    d = deltas.astype(np.float64) * np.array(stds) + np.array(means)
    r = rois.astype(np.float64)
    mr = abs(np.log(wh_ratio_clip))
    px, py = (r[:, 0] + r[:, 2]) / 2, (r[:, 1] + r[:, 3]) / 2
    pw, ph = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    gw, gh = pw * np.exp(np.clip(d[:, 2], -mr, mr)), ph * np.exp(np.clip(d[:, 3], -mr, mr))
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    out = np.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], -1)
    if max_shape is not None:
        h, w = max_shape
        out = np.clip(out, 0, [w, h, w, h])
    return out


def test_delta_coder_vs_torchvision_boxcoder():
    rng = np.random.default_rng(3)
    anchors, gt = _rand_boxes(rng, 50), _rand_boxes(rng, 50)
    stds = (0.1, 0.1, 0.2, 0.2)
    coder = BoxCoder(weights=tuple(1.0 / s for s in stds))
    ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    enc = np.asarray(B.delta_encode(anchors, gt, stds=stds))
    np.testing.assert_allclose(enc, ref, rtol=1e-5, atol=1e-5)
    # decode (no clipping) inverts encode and equals torchvision decode_single
    deltas = rng.normal(0, 1.5, (50, 4)).astype(np.float32)
    deltas[0, 2:] = [9.0, -9.0]  # hits the wh_ratio_clip clamp on both sides
    ref_dec = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    dec = np.asarray(B.delta_decode(anchors, deltas, stds=stds))
    np.testing.assert_allclose(dec, ref_dec, rtol=1e-5, atol=1e-3)
    back = np.asarray(B.delta_decode(anchors, enc, stds=stds))
    np.testing.assert_allclose(back, gt, rtol=1e-5, atol=1e-3)


def test_delta_decode_clip_means_and_batch_vs_numpy_mmdet():
    rng = np.random.default_rng(4)
    rois = _rand_boxes(rng, 2 * 30, size=120.0).reshape(2, 30, 4)
    deltas = rng.normal(0, 1.0, (2, 30, 4)).astype(np.float32)
    means, stds = (0.05, -0.1, 0.1, 0.0), (0.1, 0.1, 0.2, 0.2)
    shapes = np.array([[80, 100], [120, 60]], np.int32)  # (h, w) per image
    got = np.asarray(B.delta_decode(rois, deltas, means, stds, max_shape=shapes))
    for i in range(2):
        ref = _np_delta2bbox(rois[i], deltas[i], means, stds, tuple(shapes[i]))
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-4)
    assert (got[0][:, [0, 2]] <= 100).all() and (got[1][:, [1, 3]] <= 120).all()
    # one (h, w) for all, and per-class deltas [N, 4*K]
    k_deltas = np.concatenate([deltas[0], deltas[1]], -1)  # K = 2
    got_k = np.asarray(B.delta_decode(rois[0], k_deltas, means, stds, max_shape=(80, 100)))
    for k in range(2):
        ref = _np_delta2bbox(rois[0], deltas[k], means, stds, (80, 100))
        np.testing.assert_allclose(got_k[:, 4 * k : 4 * k + 4], ref, rtol=1e-5, atol=1e-4)
    # encode with means/stds inverts decode (no clipping)
    dec = np.asarray(B.delta_decode(rois[0], deltas[0], means, stds))
    np.testing.assert_allclose(
        np.asarray(B.delta_encode(rois[0], dec, means, stds)), deltas[0], rtol=1e-4, atol=1e-4
    )


def test_distance_clip_rescale_vs_numpy():
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 64, (20, 2)).astype(np.float32)
    dist = rng.uniform(0, 40, (20, 4)).astype(np.float32)
    ref = np.stack(
        [
            pts[:, 0] - dist[:, 0],
            pts[:, 1] - dist[:, 1],
            pts[:, 0] + dist[:, 2],
            pts[:, 1] + dist[:, 3],
        ],
        -1,
    )
    np.testing.assert_allclose(np.asarray(B.distance2bbox(pts, dist)), ref, rtol=1e-6)
    clipped = np.asarray(B.distance2bbox(pts, dist, max_shape=(50, 70)))
    np.testing.assert_allclose(clipped, np.clip(ref, 0, [70, 50, 70, 50]), rtol=1e-6)
    back = np.asarray(B.bbox2distance(pts, ref))
    np.testing.assert_allclose(back, dist, rtol=1e-5, atol=1e-4)
    lim = np.asarray(B.bbox2distance(pts, ref, max_dis=30.0))
    np.testing.assert_allclose(lim, np.clip(dist, 0, 29.9), rtol=1e-5, atol=1e-4)
    sf = np.array([0.5, 0.25, 0.5, 0.25], np.float32)
    np.testing.assert_allclose(np.asarray(B.rescale_boxes(ref, sf)), ref / sf, rtol=1e-6)
    batched = np.asarray(B.clip_boxes(np.stack([ref, ref]), np.array([[50, 70], [20, 30]])))
    np.testing.assert_allclose(batched[1], np.clip(ref, 0, [30, 20, 30, 20]))

"""Parity of fgd_jax.ops.anchors.

References:
- a torch transcription of mmdetection 2.x `AnchorGenerator` (gen_single_level_base_anchors with
  scale_major=True, `_meshgrid(row_major=True)`, `single_level_grid_anchors`) written below;
  exact equality expected (same float32 ops);
- torchvision `AnchorGenerator`: same layout (ratio-major, scale-fastest, location-major,
  shifts x*stride) but it rounds the base anchors, so we compare `round(ours)` with it;
- mmdetection 2.11 FCOS points `x * stride + stride // 2` (torch transcription).
"""

import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fgd_jax.ops import anchors as A


def _mmdet_anchors_torch(base_size, scales, ratios, feat_h, feat_w, stride, center_offset=0.0):
    w = h = base_size
    xc, yc = center_offset * w, center_offset * h
    ratios, scales = torch.tensor(ratios, dtype=torch.float32), torch.tensor(scales)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h * h_ratios[:, None] * scales[None, :]).view(-1)
    base = torch.stack([xc - 0.5 * ws, yc - 0.5 * hs, xc + 0.5 * ws, yc + 0.5 * hs], dim=-1)
    shift_x = torch.arange(0, feat_w) * stride
    shift_y = torch.arange(0, feat_h) * stride
    xx = shift_x.repeat(len(shift_y))
    yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).type_as(base)
    return (base[None, :, :] + shifts[:, None, :]).view(-1, 4).numpy()


def test_retinanet_anchors_match_mmdet_transcription():
    scales = A.retinanet_scales(4, 3)
    ref_scales = np.array([2 ** (i / 3) for i in range(3)]) * 4
    np.testing.assert_array_equal(scales, torch.Tensor(ref_scales).numpy())
    ratios = (0.5, 1.0, 2.0)
    sizes, strides = [(5, 7), (3, 4), (2, 2)], [8, 16, 32]
    got = A.multi_level_anchors(sizes, strides, scales, ratios)
    for (h, w), s, g in zip(sizes, strides, got, strict=True):
        ref = _mmdet_anchors_torch(s, scales.tolist(), list(ratios), h, w, s)
        assert g.shape == (h * w * 9, 4)
        np.testing.assert_allclose(np.asarray(g), ref, rtol=0, atol=1e-5)
    # layout: index (y * W + x) * A + a  -> anchor centre at (x * stride, y * stride)
    g0 = np.asarray(got[0]).reshape(5, 7, 9, 4)
    ctr = (g0[..., :2] + g0[..., 2:]) / 2
    np.testing.assert_allclose(ctr[3, 6, 4], [6 * 8, 3 * 8], atol=1e-5)
    # ratio-major: anchors 0..2 have ratio 0.5 (h/w < 1) with increasing scale
    wh = g0[0, 0, :, 2:] - g0[0, 0, :, :2]
    np.testing.assert_allclose(wh[:3, 1] / wh[:3, 0], 0.5, rtol=1e-5)
    assert (np.diff(wh[:3, 0]) > 0).all()


def test_center_offset_matches_mmdet_transcription():
    got = np.asarray(A.grid_anchors(A.base_anchors(16, [1.0, 2.0], [1.0, 2.0], 0.5), 2, 3, 16))
    ref = _mmdet_anchors_torch(16, [1.0, 2.0], [1.0, 2.0], 2, 3, 16, center_offset=0.5)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_anchors_vs_torchvision_anchor_generator():
    strides, feats = (8, 16), [(8, 6), (4, 3)]
    scales = A.retinanet_scales(4, 3)
    ratios = (0.5, 1.0, 2.0)
    tv = AnchorGenerator(
        sizes=tuple(tuple(float(s * x) for x in scales) for s in strides),
        aspect_ratios=(ratios,) * len(strides),
    )
    images = ImageList(torch.zeros(1, 3, 64, 48), [(64, 48)])
    fmaps = [torch.zeros(1, 1, h, w) for h, w in feats]
    ref = tv(images, fmaps)[0].numpy()
    levels = A.multi_level_anchors(feats, strides, scales, ratios)
    ours = np.concatenate([np.asarray(a) for a in levels])
    np.testing.assert_allclose(np.round(ours), ref, rtol=0, atol=1e-4)


def test_grid_points_mmdet_fcos():
    for h, w, s in [(3, 4, 8), (2, 5, 128), (3, 2, 5)]:
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ref = torch.stack((x.reshape(-1) * s, y.reshape(-1) * s), dim=-1) + s // 2
        np.testing.assert_array_equal(np.asarray(A.grid_points(h, w, s)), ref.float().numpy())
    pts = A.multi_level_points([(3, 4), (2, 2)], [8, 16])
    assert [p.shape for p in pts] == [(12, 2), (4, 2)]

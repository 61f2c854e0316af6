"""Parity of fgd_jax.ops.roi_align with torchvision.ops.roi_align (forward and d/d features).

torchvision's roi_align is the same kernel as mmcv's RoIAlign that mmdetection 2.x uses
(aligned=True, sampling_ratio=0). RoIs include boxes partly / fully outside the map, tiny and
zero-size boxes and large boxes (adaptive grids from 1 to 7 samples per bin side). The
multi-level extractor is compared with a torch transcription of mmdet's SingleRoIExtractor
(map_roi_levels + one torchvision roi_align per level). Reference computed in float64;
tolerance forward atol 1e-5 / rtol 1e-5, gradients atol 5e-5 (see GRAD_ATOL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from fgd_jax.ops import roi_align as RA

# Feature gradients sum hundreds of fp32 terms per element: torchvision's own fp32 gradient is
# up to ~2.2e-5 away from its fp64 one here, so we allow 5e-5 (forward: 1e-5).
GRAD_ATOL = 5e-5


def _rois(rng, n, h, w, stride):
    H, W = h * stride, w * stride  # image pixels
    xy = rng.uniform(-0.2 * W, W, (n, 2))
    wh = rng.uniform(0.5, 0.8 * W, (n, 2))
    r = np.concatenate([xy, xy + wh], 1)
    r[0] = [-30, -20, 10, 15]  # partly outside (top-left)
    r[1] = [W - 8, H - 5, W + 40, H + 30]  # partly outside (bottom-right)
    r[2] = [W + 50, 10, W + 90, 40]  # fully outside: zeros
    r[3] = [12.3, 7.7, 12.9, 8.1]  # tiny
    r[4] = [20, 20, 20, 20]  # zero size
    r[5] = [0, 0, W, H]  # whole image: largest adaptive grid
    return r.astype(np.float32)


def _tv(feat_hwc, rois, scale, out, sr, aligned):
    """torchvision roi_align in float64 on the float32 inputs (boxes kept in float32 then
    widened, so the sampling grid is the fp32 one): a reference free of fp32 accumulation error
    (torchvision's own fp32 gradient differs from it by up to ~2e-5 when many samples add up)."""
    f = torch.from_numpy(np.ascontiguousarray(feat_hwc.transpose(2, 0, 1)[None])).double()
    f.requires_grad_()
    boxes = torch.cat([torch.zeros(len(rois), 1), torch.from_numpy(rois)], 1).double()
    y = torchvision.ops.roi_align(f, boxes, out, scale, sr, aligned)
    return f, y


@pytest.mark.parametrize(
    "sr,aligned,out", [(0, True, (7, 7)), (2, True, (4, 6)), (0, False, (5, 3))]
)
def test_roi_align_forward_and_grad_vs_torchvision(sr, aligned, out):
    rng = np.random.default_rng(sr + 10 * aligned)
    h, w, c, stride = 13, 17, 3, 4
    feat = rng.normal(0, 1, (h, w, c)).astype(np.float32)
    rois = _rois(rng, 24, h, w, stride)
    f, y = _tv(feat, rois, 1.0 / stride, out, sr, aligned)
    ref = y.detach().numpy().transpose(0, 2, 3, 1)
    fn = jax.jit(lambda x, r: RA.roi_align(x, r, 1.0 / stride, out, sr, aligned))
    got = np.asarray(fn(feat, rois))
    assert got.shape == (24, *out, c)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert (got[2] == 0).all()
    # gradient w.r.t. features for a random cotangent
    cot = rng.normal(0, 1, got.shape).astype(np.float32)
    (y * torch.from_numpy(cot.transpose(0, 3, 1, 2)).double()).sum().backward()
    g = jax.grad(lambda x: jnp.sum(fn(x, rois) * cot))(jnp.asarray(feat))
    np.testing.assert_allclose(
        np.asarray(g), f.grad[0].numpy().transpose(1, 2, 0), rtol=1e-5, atol=GRAD_ATOL
    )


def test_batched_features():
    rng = np.random.default_rng(1)
    feat = rng.normal(0, 1, (2, 9, 11, 2)).astype(np.float32)
    rois = np.stack([_rois(rng, 8, 9, 11, 8), _rois(rng, 8, 9, 11, 8)])
    got = np.asarray(RA.roi_align(feat, rois, 1 / 8, (3, 3)))
    for b in range(2):
        ref = _tv(feat[b], rois[b], 1 / 8, (3, 3), 0, True)[1].detach().numpy()
        np.testing.assert_allclose(got[b], ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="roi_align"):
        RA.roi_align(feat, rois[0], 1 / 8)


def _mmdet_levels(rois, num_levels=4, finest_scale=56):
    r = torch.from_numpy(rois)
    scale = torch.sqrt((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]))
    lv = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lv.clamp(min=0, max=num_levels - 1).long().numpy()


@pytest.mark.slow
def test_map_roi_levels_and_multi_level_vs_mmdet_extractor():
    rng = np.random.default_rng(2)
    strides = (4, 8, 16, 32)
    img = 320
    feats = [rng.normal(0, 1, (img // s, img // s, 2)).astype(np.float32) for s in strides]
    xy = rng.uniform(0, img - 10, (40, 2))
    side = np.exp(rng.uniform(np.log(4), np.log(img), (40, 1)))
    rois = np.concatenate([xy, xy + side * rng.uniform(0.5, 2.0, (40, 2))], 1).astype(np.float32)
    rois[0] = [10, 10, 66, 66]  # exactly at the 56 * 2^k boundary (sqrt area 56)
    rois[1] = [0, 0, 112, 112]
    rois[2] = [-100, -90, 400, 410]  # sqrt area 500: level 3, partly outside
    lv = np.asarray(RA.map_roi_levels(rois))
    np.testing.assert_array_equal(lv, _mmdet_levels(rois))
    assert set(lv.tolist()) == {0, 1, 2, 3}
    # SingleRoIExtractor: zeros, then each level pools its own rois
    ref = np.zeros((40, 2, 7, 7), np.float64)
    grads = [np.zeros_like(f) for f in feats]
    cot = rng.normal(0, 1, (40, 7, 7, 2)).astype(np.float32)
    for i, s in enumerate(strides):
        m = lv == i
        f, y = _tv(feats[i], rois[m], 1.0 / s, (7, 7), 0, True)
        ref[m] = y.detach().numpy()
        (y * torch.from_numpy(cot[m].transpose(0, 3, 1, 2)).double()).sum().backward()
        grads[i] = f.grad[0].numpy().transpose(1, 2, 0)
    fn = jax.jit(lambda fs, r: RA.multi_level_roi_align(fs, r, strides))
    got = np.asarray(fn(feats, rois))
    np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda fs: jnp.sum(fn(fs, rois) * cot))([jnp.asarray(f) for f in feats])
    for gi, ri in zip(g, grads, strict=True):
        np.testing.assert_allclose(np.asarray(gi), ri, rtol=1e-5, atol=GRAD_ATOL)


def test_bfloat16_features_accumulate_in_fp32():
    """bf16 maps (mixed precision): output and gradient keep the feature dtype, values equal to
    torchvision on the bf16-rounded features within bf16 resolution (rtol 1e-2)."""
    rng = np.random.default_rng(3)
    feat = rng.normal(0, 1, (10, 12, 2)).astype(np.float32)
    rounded = np.asarray(jnp.asarray(feat, jnp.bfloat16).astype(jnp.float32))
    rois = _rois(rng, 10, 10, 12, 4)
    ref = _tv(rounded, rois, 0.25, (7, 7), 0, True)[1].detach().numpy().transpose(0, 2, 3, 1)
    got = RA.roi_align(jnp.asarray(feat, jnp.bfloat16), rois, 0.25)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-2)
    g = jax.grad(lambda x: RA.roi_align(x, rois, 0.25).astype(jnp.float32).sum())(
        jnp.asarray(feat, jnp.bfloat16)
    )
    assert g.dtype == jnp.bfloat16

"""Mask ops: Mask R-CNN mask targets rebuilt from per-GT mask grids (static shapes).

mmdetection 2.x `mask_target_single`: each positive proposal, clipped to the padded canvas,
RoIAligns (`aligned=True`, `sampling_ratio=0`) its GT's full-canvas bitmap to 28 x 28 and
thresholds at 0.5 (`BitmapMasks.crop_and_resize`, `>= 0.5`). The batch does not carry full
bitmaps but per-GT grids (`fgd_jax.data.masks.mask_grid`): `M x M` RoIAlign values of the
bitmap over a box `region` outside which the bitmap's interpolant is zero. `mask_targets`
reads the grid as samples at its cell centres, bilinear with zeros beyond the grid, averages
`samples x samples` points per output bin at mmdetection's aligned sample positions, and
thresholds at 0.5. Its distance to mmdetection's targets (mean IoU over proposals jittered
around GT boxes of COCO-like polygons) is measured by benchmarks/mask_targets.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fgd_jax.ops.dtypes import float_dtype


def grid_point_weights(t: Array, lo: Array, hi: Array, cells: int) -> Array:
    """`[..., cells]`: bilinear weights of the points `t` (continuous pixels) on the centres of
    `cells` grid cells spanning `[lo, hi]` (broadcast against `t`), zero beyond the grid."""
    cell = jnp.maximum((hi - lo) / cells, 1e-6)
    u = (t - lo) / cell - 0.5
    low = jnp.floor(u)
    frac = u - low
    idx = jnp.arange(cells, dtype=u.dtype)
    w = (idx == low[..., None]) * (1.0 - frac)[..., None] + (idx == low[..., None] + 1.0) * frac[
        ..., None
    ]
    return w.astype(u.dtype)


def _axis_weights(
    lo: Array, hi: Array, g_lo: Array, g_hi: Array, out: int, cells: int, samples: int
) -> Array:
    """`[P, out, cells]`: bin b of interval [lo, hi] as a combination of the grid's cells
    (grid interval [g_lo, g_hi], `cells` cells); all inputs `[P]` continuous pixels."""
    dt = lo.dtype
    b = jnp.arange(out, dtype=dt)[:, None]
    k = (jnp.arange(samples, dtype=dt)[None, :] + 0.5) / samples
    t = lo[:, None, None] + (b + k)[None] * ((hi - lo) / out)[:, None, None]  # [P, out, s]
    w = grid_point_weights(t, g_lo[:, None, None], g_hi[:, None, None], cells)
    return w.mean(axis=2).astype(dt)


@functools.partial(jax.jit, static_argnames=("out_size", "samples"))
def mask_targets(
    grids: Array,
    regions: Array,
    rois: Array,
    gt_inds: Array,
    pad_hw: Array,
    out_size: int = 28,
    samples: int = 2,
) -> Array:
    """Binary mask targets of one image's RoIs from its GT mask grids.

    Args:
      grids: `[G, M, M] uint8` (0..255 for 0..1) or float in [0, 1], the batch's `masks`.
      regions: `[G, 4] float32 xyxy` canvas pixels each grid covers (the batch's `mask_regions`).
      rois: `[P, 4] float32 xyxy` canvas pixels (positive proposals).
      gt_inds: `[P] int32` the GT of each RoI (any index for RoIs whose target is unused).
      pad_hw: `[2]` (H, W) of the padded canvas; RoIs are clipped to it (mmdetection).
      out_size: output bins per side (28).
      samples: sample points per bin and axis.
    Returns:
      `[P, out_size, out_size]` float (0. or 1.), in `float_dtype(rois)`.
    """
    dt = float_dtype(rois)
    rois = rois.astype(dt)
    if jnp.issubdtype(grids.dtype, jnp.integer):
        vals = grids.astype(dt) / 255.0
    else:
        vals = grids.astype(dt)
    cells = grids.shape[-1]
    gt_inds = jnp.clip(gt_inds, 0, grids.shape[0] - 1)
    g = vals[gt_inds]  # [P, M, M]
    reg = regions.astype(dt)[gt_inds]  # [P, 4]
    H, W = pad_hw[0].astype(dt), pad_hw[1].astype(dt)
    x1, x2 = jnp.clip(rois[:, 0], 0, W), jnp.clip(rois[:, 2], 0, W)
    y1, y2 = jnp.clip(rois[:, 1], 0, H), jnp.clip(rois[:, 3], 0, H)
    ay = _axis_weights(y1, y2, reg[:, 1], reg[:, 3], out_size, cells, samples)
    ax = _axis_weights(x1, x2, reg[:, 0], reg[:, 2], out_size, cells, samples)
    t = jnp.einsum("pim,pmn,pjn->pij", ay, g, ax, precision=jax.lax.Precision.HIGHEST)
    return (t >= 0.5).astype(dt)


@functools.partial(jax.jit, static_argnames=("out_hw", "threshold", "skip_empty"))
def paste_masks(
    probs: Array,
    boxes: Array,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    skip_empty: bool = False,
) -> Array:
    """mmdetection `_do_paste_mask` + threshold: masks `[N, S, S]` (probabilities of each
    detection's class) pasted into its box of an image `out_hw = (h, w)` (static).

    Pixel (y, x) reads the mask at `((x + 0.5 - x1) / (x2 - x1) * 2 - 1)` in `grid_sample`'s
    normalised coordinates (`align_corners=False`: mask column `(gx + 1) * S / 2 - 0.5`),
    bilinear with zeros outside the mask (`padding_mode='zeros'`), in float32 in PyTorch's
    order of operations; a zero-width box reads the centre (mmdetection's inf -> 0).
    `skip_empty=True` is mmdetection on CPU (one box per chunk): pixels outside
    `[floor(x1) - 1, ceil(x2) + 1)` x `[floor(y1) - 1, ceil(y2) + 1)` stay 0; on GPU (False,
    what COCO results are computed with) the whole image is sampled.

    Args:
      probs: `[N, S, S]` float in [0, 1].
      boxes: `[N, 4]` xyxy in the pixels of the image pasted into (original image pixels).
    Returns:
      `[N, h, w]` bool, `value >= threshold`.
    """
    h, w = int(out_hw[0]), int(out_hw[1])
    dt = jnp.float32
    probs = probs.astype(dt)
    boxes = boxes.astype(dt)
    s_h, s_w = probs.shape[-2], probs.shape[-1]
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))

    def grid(n: int, lo: Array, hi: Array, size: int) -> Array:
        """`[N, n, size]` bilinear weights of output pixels 0..n-1 on the mask's axis."""
        g = (jnp.arange(n, dtype=dt)[None] + 0.5 - lo) / (hi - lo) * 2 - 1
        g = jnp.where(jnp.isinf(g), 0.0, g)
        u = ((g + 1) * size - 1) / 2  # grid_sample unnormalize, align_corners=False
        lo_i = jnp.floor(u)
        frac = u - lo_i
        idx = jnp.arange(size, dtype=dt)
        wts = (idx == lo_i[..., None]) * (1 - frac)[..., None] + (idx == lo_i[..., None] + 1) * (
            frac[..., None]
        )
        return wts.astype(dt)

    wy = grid(h, y1, y2, s_h)
    wx = grid(w, x1, x2, s_w)
    img = jnp.einsum("nym,nmk,nxk->nyx", wy, probs, wx, precision=jax.lax.Precision.HIGHEST)
    if skip_empty:
        x0i = jnp.maximum(jnp.floor(x1) - 1, 0)
        y0i = jnp.maximum(jnp.floor(y1) - 1, 0)
        x1i = jnp.minimum(jnp.ceil(x2) + 1, w)
        y1i = jnp.minimum(jnp.ceil(y2) + 1, h)
        xs = jnp.arange(w, dtype=dt)[None]
        ys = jnp.arange(h, dtype=dt)[None]
        inside_x = (xs >= x0i) & (xs < x1i)
        inside_y = (ys >= y0i) & (ys < y1i)
        img = jnp.where(inside_y[:, :, None] & inside_x[:, None, :], img, 0.0)
    return img >= threshold


def paste_masks_np(
    probs: np.ndarray,
    boxes: np.ndarray,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
) -> np.ndarray:
    """`paste_masks` (whole image, mmdetection's GPU path) in numpy float32, for the host
    where every image has its own size (no compilation per size). Same arguments/result."""
    h, w = int(out_hw[0]), int(out_hw[1])
    probs = np.asarray(probs, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n, s_h, s_w = probs.shape

    def grid(m: int, lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = (np.arange(m, dtype=np.float32)[None] + np.float32(0.5) - lo) / (hi - lo)
            g = g * np.float32(2) - np.float32(1)
        g = np.where(np.isinf(g), np.float32(0), g)
        u = ((g + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)
        low = np.floor(u)
        frac = (u - low).astype(np.float32)
        low = low.astype(np.int64)
        out = np.zeros((n, m, size), np.float32)
        rows = np.broadcast_to(np.arange(n)[:, None], low.shape)
        cols = np.broadcast_to(np.arange(m)[None], low.shape)
        for idx, wt in ((low, 1 - frac), (low + 1, frac)):
            ok = (idx >= 0) & (idx < size)
            out[rows[ok], cols[ok], idx[ok]] = wt[ok]
        return out

    wy = grid(h, boxes[:, 1:2], boxes[:, 3:4], s_h)
    wx = grid(w, boxes[:, 0:1], boxes[:, 2:3], s_w)
    img = np.matmul(np.matmul(wy, probs), wx.transpose(0, 2, 1))
    return img >= threshold

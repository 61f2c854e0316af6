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

import jax
import jax.numpy as jnp
from jax import Array

from fgd_jax.ops.dtypes import float_dtype


def _axis_weights(
    lo: Array, hi: Array, g_lo: Array, g_hi: Array, out: int, cells: int, samples: int
) -> Array:
    """`[P, out, cells]`: bin b of interval [lo, hi] as a combination of the grid's cells
    (grid interval [g_lo, g_hi], `cells` cells); all inputs `[P]` continuous pixels."""
    dt = lo.dtype
    b = jnp.arange(out, dtype=dt)[:, None]
    k = (jnp.arange(samples, dtype=dt)[None, :] + 0.5) / samples
    t = lo[:, None, None] + (b + k)[None] * ((hi - lo) / out)[:, None, None]  # [P, out, s]
    cell = jnp.maximum((g_hi - g_lo) / cells, 1e-6)
    u = (t - g_lo[:, None, None]) / cell[:, None, None] - 0.5
    low = jnp.floor(u)
    frac = u - low
    idx = jnp.arange(cells, dtype=dt)
    w = (idx == low[..., None]) * (1.0 - frac)[..., None] + (idx == low[..., None] + 1.0) * frac[
        ..., None
    ]
    return w.mean(axis=2).astype(dt)


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

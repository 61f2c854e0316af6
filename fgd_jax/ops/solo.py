"""Ops of SOLO (mmdetection 2.x `SOLOHead`), static shapes.

- `resize_bilinear`: PyTorch `F.interpolate(mode='bilinear', align_corners=False)` (no
  antialiasing) on NHWC maps, as two static interpolation matrices.
- `dice_loss`: mmdetection `dice_loss` (`naive_dice=False`, eps 1e-3) from per-instance sums.
- `matrix_nms`: mmdetection `mask_matrix_nms` on a padded, fixed-size set of masks.
- `grid_masks_at_stride` / `grid_center_of_mass`: full-image GT masks at a feature stride and
  each GT's mass centre rebuilt from the batch's per-GT mask grids (`masks`, `mask_regions`,
  docs/contracts.md) instead of mmdetection's full bitmaps (see `fgd_jax.models.solo`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fgd_jax.ops.dtypes import float_dtype
from fgd_jax.ops.masks import grid_point_weights

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------- resize
@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """`[out_size, in_size] float32`: PyTorch's bilinear (`align_corners=False`) along one axis.

    Source coordinate `max((dst + 0.5) * r - 0.5, 0)` with `r = in / out` (or `1 / scale` when
    `F.interpolate` got `scale_factor=scale`), in float32 as ATen; corners `i0 = floor(src)`
    and `i0 + 1` (clamped to the input) weighted `1 - frac` and `frac`."""
    r = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * r - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), np.float32(1.0) - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def resize_bilinear(
    x: Array, size: tuple[int, int], scale: float | None = None, axes: tuple[int, int] = (1, 2)
) -> Array:
    """Bilinear resize of the two spatial `axes` of `x` (default NHWC) to `size = (h, w)`,
    PyTorch `F.interpolate(mode='bilinear', align_corners=False)` (`scale`: its
    `scale_factor`, which changes the source coordinates only when `size` is not an exact
    multiple). Computed in `float_dtype(x)`."""
    dt = float_dtype(x)
    ay, ax = axes
    out = jnp.asarray(x, dt)
    for axis, n_out in ((ay, int(size[0])), (ax, int(size[1]))):
        n_in = x.shape[axis]
        if n_in == n_out and scale is None:
            continue  # PyTorch's identity
        r = jnp.asarray(bilinear_matrix(n_in, n_out, scale), dt)
        out = jnp.moveaxis(jnp.tensordot(r, out, axes=((1,), (axis,)), precision=HIGHEST), 0, axis)
    return out


# ------------------------------------------------------------------------------------ dice
def dice_loss(
    pred: Array, target: Array, eps: float = 1e-3, axis: tuple[int, ...] = (-2, -1)
) -> Array:
    """mmdetection `dice_loss` (`naive_dice=False`): `1 - 2 sum(p t) / (sum(p^2) + eps +
    sum(t^2) + eps)` over `axis`; `pred` are probabilities (after the sigmoid)."""
    dt = float_dtype(pred, target)
    p = jnp.asarray(pred, dt)
    t = jnp.asarray(target, dt)
    a = jnp.sum(p * t, axis=axis)
    b = jnp.sum(p * p, axis=axis) + eps
    c = jnp.sum(t * t, axis=axis) + eps
    return 1.0 - 2.0 * a / (b + c)


def dice_from_sums(inter: Array, pred_sq: Array, target_sq: Array, eps: float = 1e-3) -> Array:
    """`dice_loss` from its sums `sum(p t)`, `sum(p^2)`, `sum(t^2)` (any matching shapes)."""
    return 1.0 - 2.0 * inter / ((pred_sq + eps) + (target_sq + eps))


# ------------------------------------------------------------------------------ matrix NMS
def matrix_nms(
    masks: Array,
    labels: Array,
    scores: Array,
    valid: Array,
    mask_area: Array | None = None,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    filter_thr: float = -1.0,
    max_num: int = -1,
) -> dict[str, Array]:
    """mmdetection `mask_matrix_nms` on a padded set of N masks (N = its `nms_pre`: the caller
    passes the best N candidates, `valid` False on padding).

    Args:
      masks: `[N, ...]` binary (bool or 0/1); labels `[N] int`; scores `[N]`; valid `[N] bool`;
      mask_area: `[N]` (default: the masks' sums).
      kernel: 'gaussian' (`exp(-sigma iou^2)` ratios) or 'linear'.
      filter_thr: decayed scores `>= filter_thr` are kept (`<= 0`: all valid ones).
      max_num: entries returned (`<= 0`: N).
    Returns: dict(scores `[K]` decayed, sorted descending, labels `[K] int32`, index `[K]
      int32` into the input, valid `[K] bool`), K = max_num; padded slots 0 / invalid.
      Equal scores: lower index first (mmdetection's `torch.sort` leaves ties unspecified).
    """
    dt = float_dtype(scores)
    n = scores.shape[0]
    scores = jnp.asarray(scores, dt)
    key = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    s_scores = scores[order]
    s_valid = valid[order]
    s_labels = jnp.asarray(labels, jnp.int32)[order]
    flat = masks.reshape(n, -1)[order]
    flat = jnp.where(s_valid[:, None], flat.astype(dt), 0.0)
    area = flat.sum(-1) if mask_area is None else jnp.asarray(mask_area, dt)[order]
    area = jnp.where(s_valid, area, 0.0)
    inter = jnp.matmul(flat, flat.T, precision=HIGHEST)
    union = area[None, :] + area[:, None] - inter
    iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    same = (s_labels[None, :] == s_labels[:, None]) & upper & s_valid[None, :] & s_valid[:, None]
    decay_iou = jnp.where(same, iou, 0.0)
    compensate = decay_iou.max(axis=0)  # [N]: for each i, its largest IoU with a better one
    comp = compensate[:, None]  # row i: compensation of the suppressor i
    if kernel == "gaussian":
        ratio = jnp.exp(-sigma * decay_iou**2) / jnp.exp(-sigma * comp**2)
    elif kernel == "linear":
        ratio = (1.0 - decay_iou) / (1.0 - comp)
    else:
        raise ValueError(f"matrix_nms: kernel {kernel!r} is not 'gaussian' or 'linear'")
    coef = ratio.min(axis=0)
    new = s_scores * coef
    keep = s_valid if filter_thr <= 0 else s_valid & (new >= filter_thr)
    k = n if max_num <= 0 else min(max_num, n)
    key2 = jnp.where(keep, new, -jnp.inf)
    top, pos = jax.lax.top_k(key2, k)
    ok = jnp.isfinite(top)
    return dict(
        scores=jnp.where(ok, new[pos], 0.0),
        labels=jnp.where(ok, s_labels[pos], 0).astype(jnp.int32),
        index=jnp.where(ok, order[pos], 0).astype(jnp.int32),
        valid=ok,
    )


# ------------------------------------------------------------------- GT masks from the grids
def _grid_values(grids: Array, dt) -> Array:
    if jnp.issubdtype(grids.dtype, jnp.integer):
        return grids.astype(dt) / 255.0
    return grids.astype(dt)


@functools.partial(jax.jit, static_argnames=("out_hw", "stride", "threshold"))
def grid_masks_at_stride(
    grids: Array, regions: Array, out_hw: tuple[int, int], stride: int, threshold: float = 0.375
) -> Array:
    """Full-canvas GT masks at a feature stride from the per-GT grids.

    Cell (y, x) of the output reads the bitmap's interpolant (the grid's cell centres,
    bilinear, zero beyond the grid) at the cell's centre `(stride * (x + 0.5), stride * (y +
    0.5))` canvas pixels and thresholds it at `threshold`. mmdetection's `mmcv.imrescale(mask,
    1 / stride)` (cv2 bilinear on the 0/1 bitmap, uint8 rounding halves up) samples the bitmap
    at the same points, which lie midway between pixel centres: its value there is the mean
    of 2 x 2 pixels, one of 0, 1/4, 1/2, 3/4, 1, kept when >= 1/2. The grid's estimate of it
    is blurred by the cells, so the default threshold is 0.375, midway between the 1/4 the
    reference drops and the 1/2 it keeps: mean IoU 0.994 against mmdetection's masks
    at strides 4, 8, 16 on COCO-like polygons, 0.91-0.93 with 0.5, where every exact 1/2
    (an edge between pixels) falls either way (benchmarks/results/solo_targets_cpu.md).

    Args: grids `[G, M, M]` (uint8 0..255 or float 0..1); regions `[G, 4]` xyxy canvas pixels;
      out_hw: (h, w) static output size; stride: pixels per output cell.
    Returns: `[G, h, w]` 0./1. in `float_dtype(regions)`.
    """
    dt = float_dtype(regions)
    vals = _grid_values(grids, dt)
    reg = regions.astype(dt)
    cells = grids.shape[-1]
    ty = (jnp.arange(out_hw[0], dtype=dt) + 0.5) * stride
    tx = (jnp.arange(out_hw[1], dtype=dt) + 0.5) * stride
    # [G, h, cells] / [G, w, cells]: each output row / column on each GT's grid
    wy = grid_point_weights(ty[None, :], reg[:, 1:2], reg[:, 3:4], cells)
    wx = grid_point_weights(tx[None, :], reg[:, 0:1], reg[:, 2:3], cells)
    img = jnp.einsum("gym,gmn,gxn->gyx", wy, vals, wx, precision=HIGHEST)
    return (img >= threshold).astype(dt)


def grid_center_of_mass(grids: Array, regions: Array) -> tuple[Array, Array, Array]:
    """Mass centre of each GT's bitmap from its grid, in pixel-index coordinates as
    mmdetection's `center_of_mass` (row / column index weighted by the mask; a pixel's index
    is its centre minus 0.5): each grid cell weighs its value at the cell's centre.

    Returns: (center_h `[G]`, center_w `[G]`, nonempty `[G] bool`: the grid has any mass)."""
    dt = float_dtype(regions)
    vals = _grid_values(grids, dt)
    reg = regions.astype(dt)
    cells = grids.shape[-1]
    k = jnp.arange(cells, dtype=dt) + 0.5
    cy = reg[:, 1:2] + k[None] * ((reg[:, 3] - reg[:, 1]) / cells)[:, None] - 0.5  # [G, M]
    cx = reg[:, 0:1] + k[None] * ((reg[:, 2] - reg[:, 0]) / cells)[:, None] - 0.5
    mass = vals.sum((1, 2))
    norm = jnp.maximum(mass, 1e-6)
    center_h = jnp.sum(vals.sum(2) * cy, axis=1) / norm
    center_w = jnp.sum(vals.sum(1) * cx, axis=1) / norm
    return center_h, center_w, mass > 0

"""Box utilities with mmdetection 2.x semantics (no "+1" anywhere).

Boxes are `xyxy` float32 (float64 in a float64 run, see `ops.dtypes`) in absolute pixels of the
resized image (see docs/contracts.md).
Every function is a pure `jnp` function, jittable, and broadcasts over leading batch dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from fgd_jax.ops.dtypes import float_dtype

ArrayLike = Array | np.ndarray

_EPS = 1e-6


def box_area(boxes: ArrayLike) -> Array:
    """Area of `boxes [..., 4]` xyxy -> `[...]` (may be negative for degenerate boxes)."""
    boxes = jnp.asarray(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: ArrayLike, b: ArrayLike, mode: str = "iou", eps: float = _EPS) -> Array:
    """Pairwise overlaps, mmdetection `bbox_overlaps(a, b, mode)` with `is_aligned=False`.

    Args:
      a: `[..., N, 4]` xyxy. b: `[..., M, 4]` xyxy (same leading dims, or broadcastable).
      mode: 'iou' (intersection / union), 'iof' (intersection / area(a)) or 'giou'.
      eps: the union (or area(a), or the enclosing area) is clamped to at least `eps`.
    Returns: `[..., N, M]` float32.
    """
    dt = float_dtype(a, b)
    a = jnp.asarray(a, dt)
    b = jnp.asarray(b, dt)
    return _overlaps(a[..., :, None, :], b[..., None, :, :], mode, eps)


def box_iou_aligned(a: ArrayLike, b: ArrayLike, mode: str = "iou", eps: float = _EPS) -> Array:
    """Elementwise overlaps of `a [..., 4]` and `b [..., 4]` -> `[...]`.

    mmdetection `bbox_overlaps(a, b, mode, is_aligned=True)`; `mode` as in `box_iou`.
    """
    dt = float_dtype(a, b)
    return _overlaps(jnp.asarray(a, dt), jnp.asarray(b, dt), mode, eps)


def giou(a: ArrayLike, b: ArrayLike, eps: float = _EPS) -> Array:
    """Pairwise generalized IoU `[..., N, 4] x [..., M, 4] -> [..., N, M]` (mmdet mode 'giou')."""
    return box_iou(a, b, mode="giou", eps=eps)


def _overlaps(a: Array, b: Array, mode: str, eps: float) -> Array:
    if mode not in ("iou", "iof", "giou"):
        raise ValueError(f"fgd_jax.ops.boxes: unknown overlap mode {mode!r} (iou | iof | giou)")
    area_a = box_area(a)
    area_b = box_area(b)
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    if mode == "iof":
        union = area_a
    else:
        union = area_a + area_b - inter
    union = jnp.maximum(union, eps)
    ious = inter / union
    if mode != "giou":
        return ious
    enc_lt = jnp.minimum(a[..., :2], b[..., :2])
    enc_rb = jnp.maximum(a[..., 2:], b[..., 2:])
    enc_wh = jnp.clip(enc_rb - enc_lt, 0.0)
    enclose = jnp.maximum(enc_wh[..., 0] * enc_wh[..., 1], eps)
    return ious - (enclose - union) / enclose


# ------------------------------------------------------------------------- DeltaXYWHBBoxCoder
def delta_encode(
    proposals: ArrayLike,
    gt: ArrayLike,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Array:
    """mmdetection `bbox2delta`: regression targets of `gt` w.r.t. `proposals`.

    Args: proposals, gt: `[..., 4]` xyxy (same shape). Returns `[..., 4]` (dx, dy, dw, dh),
    normalized as `(delta - means) / stds`. Degenerate proposals give inf/nan, as mmdetection;
    callers mask them out with their positive mask (use `jnp.where` before the loss).
    """
    dt = float_dtype(proposals, gt)
    p = jnp.asarray(proposals, dt)
    g = jnp.asarray(gt, dt)
    px = (p[..., 0] + p[..., 2]) * 0.5
    py = (p[..., 1] + p[..., 3]) * 0.5
    pw = p[..., 2] - p[..., 0]
    ph = p[..., 3] - p[..., 1]
    gx = (g[..., 0] + g[..., 2]) * 0.5
    gy = (g[..., 1] + g[..., 3]) * 0.5
    gw = g[..., 2] - g[..., 0]
    gh = g[..., 3] - g[..., 1]
    deltas = jnp.stack(
        [(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1
    )
    return (deltas - jnp.asarray(means, dt)) / jnp.asarray(stds, dt)


def delta_decode(
    rois: ArrayLike,
    deltas: ArrayLike,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: ArrayLike | Sequence[int] | None = None,
    wh_ratio_clip: float = 16 / 1000,
) -> Array:
    """mmdetection `delta2bbox` (clip_border=True, no center clamp).

    Args:
      rois: `[..., N, 4]` xyxy base boxes (anchors / proposals).
      deltas: `[..., N, 4 * K]` encoded offsets (K = 1, or one set per class).
      max_shape: optional `(h, w)` of the image, or `[..., 2]` one per leading batch element
        (e.g. `img_shape [B, 2]` for rois `[B, N, 4]`); boxes are clipped to `[0, w] x [0, h]`.
      wh_ratio_clip: dw, dh are clamped to `+-|log(wh_ratio_clip)|`.
    Returns: `[..., N, 4 * K]` xyxy float32.
    """
    dt = float_dtype(rois, deltas)
    rois = jnp.asarray(rois, dt)
    deltas = jnp.asarray(deltas, dt)
    if deltas.shape[-1] % 4 != 0:
        raise ValueError(f"fgd_jax.ops.boxes.delta_decode: deltas last dim {deltas.shape[-1]} % 4")
    k = deltas.shape[-1] // 4
    d = deltas.reshape(deltas.shape[:-1] + (k, 4))
    d = d * jnp.asarray(stds, dt) + jnp.asarray(means, dt)
    dx, dy, dw, dh = d[..., 0], d[..., 1], d[..., 2], d[..., 3]
    px = ((rois[..., 0] + rois[..., 2]) * 0.5)[..., None]
    py = ((rois[..., 1] + rois[..., 3]) * 0.5)[..., None]
    pw = (rois[..., 2] - rois[..., 0])[..., None]
    ph = (rois[..., 3] - rois[..., 1])[..., None]
    max_ratio = float(np.abs(np.log(wh_ratio_clip)))
    dw = jnp.clip(dw, -max_ratio, max_ratio)
    dh = jnp.clip(dh, -max_ratio, max_ratio)
    gw = pw * jnp.exp(dw)
    gh = ph * jnp.exp(dh)
    gx = px + pw * dx
    gy = py + ph * dy
    boxes = jnp.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=-1)
    if max_shape is not None:
        ms = jnp.asarray(max_shape, dt)[..., :2]
        # (h, w) -> per-coordinate upper bound (w, h, w, h), broadcast over [N, K].
        upper = jnp.stack([ms[..., 1], ms[..., 0], ms[..., 1], ms[..., 0]], axis=-1)
        upper = upper[..., None, None, :]
        boxes = jnp.where(boxes < 0.0, 0.0, boxes)
        boxes = jnp.where(boxes > upper, upper, boxes)
    return boxes.reshape(deltas.shape)


# ------------------------------------------------------------------------------ FCOS distance
def distance2bbox(
    points: ArrayLike, distance: ArrayLike, max_shape: ArrayLike | Sequence[int] | None = None
) -> Array:
    """mmdetection `distance2bbox`: `points [..., N, 2]` (x, y) and `distance [..., N, 4]`
    (left, top, right, bottom) -> boxes `[..., N, 4]` xyxy, clipped to `[0, w] x [0, h]` when
    `max_shape = (h, w)` (or `[..., 2]` per batch element) is given."""
    dt = float_dtype(points, distance)
    p = jnp.asarray(points, dt)
    d = jnp.asarray(distance, dt)
    x, y = p[..., 0], p[..., 1]
    boxes = jnp.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], axis=-1)
    if max_shape is not None:
        boxes = clip_boxes(boxes, max_shape)
    return boxes


def bbox2distance(
    points: ArrayLike, bbox: ArrayLike, max_dis: float | None = None, eps: float = 0.1
) -> Array:
    """mmdetection `bbox2distance`: `points [..., 2]`, `bbox [..., 4]` -> `[..., 4]` (l, t, r, b),
    clamped to `[0, max_dis - eps]` when `max_dis` is given."""
    dt = float_dtype(points, bbox)
    p = jnp.asarray(points, dt)
    b = jnp.asarray(bbox, dt)
    x, y = p[..., 0], p[..., 1]
    d = jnp.stack([x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y], axis=-1)
    if max_dis is not None:
        d = jnp.clip(d, 0.0, max_dis - eps)
    return d


def clip_boxes(boxes: ArrayLike, max_shape: ArrayLike | Sequence[int]) -> Array:
    """Clip `boxes [..., N, 4]` xyxy to `[0, w] x [0, h]`; `max_shape` is `(h, w)` or `[..., 2]`
    (one per leading batch element)."""
    dt = float_dtype(boxes)
    boxes = jnp.asarray(boxes, dt)
    ms = jnp.asarray(max_shape, dt)[..., :2]
    upper = jnp.stack([ms[..., 1], ms[..., 0], ms[..., 1], ms[..., 0]], axis=-1)[..., None, :]
    return jnp.minimum(jnp.maximum(boxes, 0.0), upper)


def rescale_boxes(boxes: ArrayLike, scale_factor: ArrayLike) -> Array:
    """Map boxes from the resized image back to the original: `boxes [..., N, 4] / scale_factor`
    where `scale_factor` is `(w, h, w, h)` `[4]` or `[..., 4]` per leading batch element."""
    dt = float_dtype(boxes, scale_factor)
    boxes = jnp.asarray(boxes, dt)
    sf = jnp.asarray(scale_factor, dt)
    return boxes / sf[..., None, :]


# ------------------------------------------------------------------------ GFL distribution
def distribution_integral(logits: ArrayLike, reg_max: int = 16) -> Array:
    """mmdetection GFL `Integral`: `logits [..., 4 * (reg_max + 1)]` (per side, `reg_max + 1`
    bins) -> `[..., 4]` expected distances `sum_i softmax(x)_i * i`, in the units of the bins
    (GFL: strides of the level)."""
    dt = float_dtype(logits)
    x = jnp.asarray(logits, dt)
    x = x.reshape(*x.shape[:-1], 4, reg_max + 1)
    project = jnp.linspace(0.0, float(reg_max), reg_max + 1, dtype=dt)
    return jnp.sum(jax.nn.softmax(x, axis=-1) * project, axis=-1)

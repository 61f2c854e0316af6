"""Anchors and points with mmdetection 2.x `AnchorGenerator` / FCOS layouts.

Anchor order inside one location: ratio-major, scale-fastest (`a = ratio_idx * S + scale_idx`).
Order over a level: location-major, `index = (y * W + x) * A + a`; levels are concatenated
finest first. All outputs are float32 xyxy in pixels of the network-input image (also in a float64
run, like mmdetection's generator under `.double()`; the box ops promote them).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import Array


def retinanet_scales(octave_base_scale: float = 4.0, scales_per_octave: int = 3) -> np.ndarray:
    """RetinaNet anchor scales: `octave_base_scale * 2 ** (i / scales_per_octave)`, `[S]`."""
    i = np.arange(scales_per_octave, dtype=np.float64)
    return (octave_base_scale * 2.0 ** (i / scales_per_octave)).astype(np.float32)


def base_anchors(
    base_size: float,
    scales: Sequence[float],
    ratios: Sequence[float],
    center_offset: float = 0.0,
) -> Array:
    """mmdet `gen_single_level_base_anchors` (scale_major=True) -> `[R*S, 4]` float32 xyxy.

    `ratios` are h / w; the anchor centre is `center_offset * base_size` in both axes.
    """
    # torch computes these in float32; do the same so the values match bit for bit.
    scales = np.asarray(scales, np.float32)
    ratios = np.asarray(ratios, np.float32)
    w = h = np.float32(base_size)
    xc = np.float32(center_offset) * w
    yc = np.float32(center_offset) * h
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h * h_ratios[:, None] * scales[None, :]).reshape(-1)
    half = np.float32(0.5)
    out = np.stack([xc - half * ws, yc - half * hs, xc + half * ws, yc + half * hs], axis=-1)
    return jnp.asarray(out, jnp.float32)


def grid_anchors(base: Array, feat_h: int, feat_w: int, stride: float) -> Array:
    """Tile `base [A, 4]` over a `feat_h x feat_w` grid with shifts `(x * stride, y * stride)`.

    Returns `[feat_h * feat_w * A, 4]` float32, index `(y * feat_w + x) * A + a`.
    """
    base = jnp.asarray(base, jnp.float32)
    sx = jnp.arange(feat_w, dtype=jnp.float32) * stride
    sy = jnp.arange(feat_h, dtype=jnp.float32) * stride
    xx = jnp.tile(sx, feat_h)
    yy = jnp.repeat(sy, feat_w)
    shifts = jnp.stack([xx, yy, xx, yy], axis=-1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def multi_level_anchors(
    feat_sizes: Sequence[tuple[int, int]],
    strides: Sequence[float],
    scales: Sequence[float],
    ratios: Sequence[float],
    base_sizes: Sequence[float] | None = None,
    center_offset: float = 0.0,
) -> list[Array]:
    """Anchors of every level: a list of `[H_l * W_l * A, 4]` (concatenate for a flat view).

    `feat_sizes`: `(H_l, W_l)` per level (static ints). `base_sizes` default to `strides`
    (mmdetection). For RetinaNet use `scales=retinanet_scales(4, 3)`, `ratios=(0.5, 1.0, 2.0)`,
    `strides=(8, 16, 32, 64, 128)`.
    """
    if len(feat_sizes) != len(strides):
        raise ValueError(
            f"fgd_jax.ops.anchors: {len(feat_sizes)} feature sizes but {len(strides)} strides"
        )
    base_sizes = strides if base_sizes is None else base_sizes
    out = []
    for (h, w), s, b in zip(feat_sizes, strides, base_sizes, strict=True):
        out.append(grid_anchors(base_anchors(b, scales, ratios, center_offset), h, w, s))
    return out


def grid_points(feat_h: int, feat_w: int, stride: int) -> Array:
    """FCOS points of one level (mmdet 2.11 `FCOSHead._get_points_single`).

    Returns `[feat_h * feat_w, 2]` float32 (x, y) = `(x * stride + stride // 2, ...)`, row-major
    (`index = y * feat_w + x`). For even strides this is `(i + 0.5) * stride`.
    """
    off = float(int(stride) // 2)
    xs = jnp.arange(feat_w, dtype=jnp.float32) * stride + off
    ys = jnp.arange(feat_h, dtype=jnp.float32) * stride + off
    return jnp.stack([jnp.tile(xs, feat_h), jnp.repeat(ys, feat_w)], axis=-1)


def multi_level_points(
    feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int]
) -> list[Array]:
    """`grid_points` for every level: list of `[H_l * W_l, 2]`."""
    return [grid_points(h, w, s) for (h, w), s in zip(feat_sizes, strides, strict=True)]

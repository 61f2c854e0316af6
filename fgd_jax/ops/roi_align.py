"""RoIAlign (torchvision / mmcv semantics, adaptive sampling exact) and mmdet RoI level mapping.

`roi_align` reproduces `torchvision.ops.roi_align` (= mmcv `RoIAlign`, which mmdetection 2.x
uses with `aligned=True, sampling_ratio=0`), forward and gradient w.r.t. the features:
- aligned: box corners are shifted by -0.5 pixel after scaling; otherwise width/height >= 1;
- each of the `out_h x out_w` bins averages a `gh x gw` grid of bilinear samples, where
  `gh = sampling_ratio` or, when `sampling_ratio <= 0`, `ceil(roi_h / out_h)` per RoI;
- a sample with y < -1, y > H, x < -1 or x > W contributes 0 (but still counts); otherwise
  coordinates are clamped at 0 and at H-1 / W-1 as in torchvision.

Static shapes with an exact adaptive grid: the samples are visited in a `lax.while_loop` whose
trip count is the largest grid in the call (`max_r gh_r * gw_r`, data dependent; each RoI
masks the samples beyond its own grid), so no cap is needed and cost follows the RoIs present.
The backward pass is a `custom_vjp` running the same loop with a scatter-add (no gradient
w.r.t. the RoIs, as torchvision / mmcv).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import Array, lax

from fgd_jax.ops.dtypes import float_dtype


def map_roi_levels(rois: Array, num_levels: int = 4, finest_scale: float = 56.0) -> Array:
    """mmdet `SingleRoIExtractor.map_roi_levels`: `rois [..., 4]` xyxy image pixels -> level
    `[...]` int32 = clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, num_levels - 1)."""
    rois = jnp.asarray(rois, float_dtype(rois))
    scale = jnp.sqrt((rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1]))
    lvl = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
    return jnp.clip(lvl, 0, num_levels - 1).astype(jnp.int32)


def _geometry(rois, scale, height, width, out_h, out_w, sampling_ratio, aligned):
    """Per-RoI sampling geometry, in torchvision's order of operations (in the RoIs' dtype)."""
    off = 0.5 if aligned else 0.0
    x1 = rois[:, 0] * scale - off
    y1 = rois[:, 1] * scale - off
    x2 = rois[:, 2] * scale - off
    y2 = rois[:, 3] * scale - off
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = roi_h / out_h
    bin_w = roi_w / out_w
    if sampling_ratio > 0:
        gh = jnp.full(rois.shape[:1], sampling_ratio, jnp.int32)
        gw = gh
    else:
        gh = jnp.ceil(roi_h / out_h).astype(jnp.int32)
        gw = jnp.ceil(roi_w / out_w).astype(jnp.int32)
    count = jnp.maximum(gh * gw, 1).astype(rois.dtype)
    return x1, y1, bin_h, bin_w, gh, gw, count


def _axis(start, bin_size, grid, i, n_bins, size):
    """Sample coordinate along one axis for all bins: `[R, n_bins]` low/high index, weights."""
    p = jnp.arange(n_bins, dtype=start.dtype)[None, :]
    g = jnp.maximum(grid, 1).astype(start.dtype)[:, None]
    c = start[:, None] + p * bin_size[:, None] + (i[:, None] + 0.5) * bin_size[:, None] / g
    size_f = size[:, None]
    inside = (c >= -1.0) & (c <= size_f)
    c = jnp.maximum(c, 0.0)
    low = jnp.floor(c)
    at_end = low >= size_f - 1.0
    low = jnp.where(at_end, size_f - 1.0, low)
    high = jnp.where(at_end, low, low + 1.0)
    c = jnp.where(at_end, low, c)
    frac = c - low
    return low.astype(jnp.int32), high.astype(jnp.int32), 1.0 - frac, frac, inside


def _corners(geom, s, out_h, out_w, sampling_ratio, aligned):
    """Flat indices `[R, out_h, out_w]` and weights of the 4 corners of sample number `s`
    (sample `s` of RoI r is grid cell `(s // gw_r, s % gw_r)`; inactive once s >= gh_r gw_r)."""
    rois, scale, height, width, offset = geom
    x1, y1, bin_h, bin_w, gh, gw, _ = _geometry(
        rois, scale, height, width, out_h, out_w, sampling_ratio, aligned
    )
    gw1 = jnp.maximum(gw, 1)
    iy = (s // gw1).astype(rois.dtype)
    ix = (s % gw1).astype(rois.dtype)
    active = (gh > 0) & (gw > 0) & (s < gh * gw)  # [R]
    yl, yh, wyl, wyh, vy = _axis(y1, bin_h, gh, iy, out_h, height)
    xl, xh, wxl, wxh, vx = _axis(x1, bin_w, gw, ix, out_w, width)
    mask = (vy[:, :, None] & vx[:, None, :] & active[:, None, None]).astype(rois.dtype)
    base = offset.astype(jnp.int32)[:, None, None]
    w_int = width.astype(jnp.int32)[:, None, None]
    out = []
    for ry, wy in ((yl, wyl), (yh, wyh)):
        for rx, wx in ((xl, wxl), (xh, wxh)):
            idx = base + ry[:, :, None] * w_int + rx[:, None, :]
            out.append((idx, wy[:, :, None] * wx[:, None, :] * mask))
    return out


def _num_samples(geom, out_h, out_w, sampling_ratio, aligned):
    """Loop trip count (the largest per-RoI grid `gh * gw`) and the per-RoI sample counts."""
    rois, scale, height, width, _ = geom
    _, _, _, _, gh, gw, count = _geometry(
        rois, scale, height, width, out_h, out_w, sampling_ratio, aligned
    )
    n = jnp.where((gh > 0) & (gw > 0), gh * gw, 0)
    return jnp.max(n, initial=0), count


@functools.cache
def _make_core(out_h: int, out_w: int, sampling_ratio: int, aligned: bool):
    def forward(flat, geom):
        total, count = _num_samples(geom, out_h, out_w, sampling_ratio, aligned)
        r = geom[0].shape[0]
        acc_dtype = float_dtype(flat)  # fp32 accumulation (fp64 in a float64 run)
        acc0 = jnp.zeros((r, out_h, out_w, flat.shape[1]), acc_dtype)

        def body(c):
            s, acc = c
            for idx, w in _corners(geom, s, out_h, out_w, sampling_ratio, aligned):
                acc = acc + w[..., None] * flat[idx]
            return s + 1, acc

        _, acc = lax.while_loop(lambda c: c[0] < total, body, (jnp.int32(0), acc0))
        return (acc / count[:, None, None, None]).astype(flat.dtype)

    @jax.custom_vjp
    def core(flat, geom):
        return forward(flat, geom)

    def fwd(flat, geom):
        return forward(flat, geom), (geom, flat.shape[0])

    def bwd(res, g):
        geom, p = res
        total, count = _num_samples(geom, out_h, out_w, sampling_ratio, aligned)
        dtype = g.dtype
        g = g.astype(float_dtype(g)) / count[:, None, None, None]
        grad0 = jnp.zeros((p, g.shape[-1]), g.dtype)

        def body(c):
            s, grad = c
            for idx, w in _corners(geom, s, out_h, out_w, sampling_ratio, aligned):
                grad = grad.at[idx.reshape(-1)].add((w[..., None] * g).reshape(-1, g.shape[-1]))
            return s + 1, grad

        _, grad = lax.while_loop(lambda c: c[0] < total, body, (jnp.int32(0), grad0))
        return grad.astype(dtype), jax.tree_util.tree_map(jnp.zeros_like, geom)

    core.defvjp(fwd, bwd)
    return core


def _check(features: Array, rois: Array, where: str) -> None:
    if rois.shape[-1] != 4 or rois.ndim != features.ndim - 1:
        raise ValueError(
            f"fgd_jax.ops.roi_align.{where}: expected features [H, W, C] with rois [R, 4] or "
            f"[B, H, W, C] with [B, R, 4]; got {features.shape} and {rois.shape}"
        )


def roi_align(
    features: Array,
    rois: Array,
    spatial_scale: float,
    output_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Array:
    """RoIAlign of one feature map.

    Args:
      features: `[H, W, C]` (or `[B, H, W, C]` with rois `[B, R, 4]`, vmapped).
      rois: `[R, 4]` xyxy in image pixels; `spatial_scale` = 1 / stride maps them to the map.
      output_size: `(out_h, out_w)`. sampling_ratio: samples per bin side; <= 0 adaptive.
    Returns: `[R, out_h, out_w, C]` (or `[B, R, out_h, out_w, C]`).
    """
    features = jnp.asarray(features)
    rois = jnp.asarray(rois, float_dtype(features, rois))
    _check(features, rois, "roi_align")
    if features.ndim == 4:
        fn = functools.partial(
            roi_align, spatial_scale=spatial_scale, output_size=output_size,
            sampling_ratio=sampling_ratio, aligned=aligned,
        )  # fmt: skip
        return jax.vmap(fn)(features, rois)
    h, w, c = features.shape
    r = rois.shape[0]
    full = lambda v: jnp.full((r,), v, rois.dtype)  # noqa: E731
    geom = (rois, full(spatial_scale), full(h), full(w), full(0))
    core = _make_core(int(output_size[0]), int(output_size[1]), int(sampling_ratio), aligned)
    return core(features.reshape(h * w, c), geom)


def multi_level_roi_align(
    features: Sequence[Array],
    rois: Array,
    strides: Sequence[int],
    output_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
) -> Array:
    """mmdet `SingleRoIExtractor`: each RoI is pooled from level `map_roi_levels(rois)`.

    Args:
      features: sequence of `[H_l, W_l, C]` maps (finest first; or `[B, H_l, W_l, C]` with rois
        `[B, R, 4]`). rois: `[R, 4]` xyxy image pixels. strides: one per level.
    Returns: `[R, out_h, out_w, C]` (or `[B, R, out_h, out_w, C]`).
    """
    features = [jnp.asarray(f) for f in features]
    rois = jnp.asarray(rois, float_dtype(*features, rois))
    if len(features) != len(strides):
        raise ValueError(
            f"fgd_jax.ops.roi_align.multi_level_roi_align: {len(features)} maps, "
            f"{len(strides)} strides"
        )
    _check(features[0], rois, "multi_level_roi_align")
    if features[0].ndim == 4:
        fn = functools.partial(
            multi_level_roi_align, strides=strides, output_size=output_size,
            sampling_ratio=sampling_ratio, aligned=aligned, finest_scale=finest_scale,
        )  # fmt: skip
        return jax.vmap(fn)(features, rois)
    c = features[0].shape[-1]
    lvl = map_roi_levels(rois, len(features), finest_scale)
    sizes = [f.shape[0] * f.shape[1] for f in features]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    pick = lambda vals: jnp.asarray(vals, rois.dtype)[lvl]  # noqa: E731
    geom = (
        rois,
        pick([1.0 / s for s in strides]),
        pick([f.shape[0] for f in features]),
        pick([f.shape[1] for f in features]),
        pick(offsets),
    )
    flat = jnp.concatenate([f.reshape(-1, c) for f in features])
    core = _make_core(int(output_size[0]), int(output_size[1]), int(sampling_ratio), aligned)
    return core(flat, geom)

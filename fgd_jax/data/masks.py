"""Instance masks on the host: COCO segmentations -> fixed-size per-GT mask grids.

mmdetection 2.x (`LoadAnnotations(with_mask=True, poly2mask=True)`, `Resize`, `RandomFlip`,
`Pad`, then `mask_target_single` -> `BitmapMasks.crop_and_resize`) keeps one full-canvas
bitmap per GT: at 800x1344 and 100 GTs that is ~100 MB per image. Here each GT's mask is
kept as a *grid*: `M x M` uint8 values (0..255 for 0..1) over a box `region` of the resized,
flipped, padded canvas, where cell (i, j) holds exactly what mmdetection's RoIAlign
(`aligned=True`, `sampling_ratio=0`, mmcv / torchvision bilinear rules) of the full-canvas
bitmap returns for that cell of `region`. The region is the union of the GT box and the
mask's pixels, grown by 1 px on every side, so the bitmap's bilinear interpolant is zero
outside it and `fgd_jax.ops.masks.mask_targets` can rebuild mmdetection's 28 x 28 targets
for any proposal from the grid alone (its accuracy: benchmarks/results/mask_targets_cpu.md).

Steps, each as mmdetection does it:
  - decode: polygons (a list of parts, each `[x0, y0, x1, y1, ...]`, merged) or RLE
    (compressed, or uncompressed with a list of counts) through pycocotools at the json's
    (height, width) (`_poly2mask`);
  - resize: mmcv `imrescale(mask, scale, interpolation='nearest')` (cv2 `INTER_NEAREST`:
    source index `min(floor(dst * src_size / dst_size), src_size - 1)`), same size as the
    image;
  - flip: the resized bitmap's columns reversed (`mask[:, ::-1]`, width = resized width);
  - pad: zeros at the bottom / right up to the canvas.
Only the window of the resized bitmap around the mask is ever built.

Bad segmentations (`check_segmentation`): a polygon part with fewer than 6 coordinates, an odd
count or a non-finite / non-numeric value, an RLE whose `size` is not the image's (height,
width), or anything else that is not a COCO segmentation raises `BadMaskError` naming the
annotation file, image id and annotation id (`data.on_bad_mask='error'`); with 'skip' the bad
polygon parts are dropped (mmdetection 3.x drops parts with fewer than 6 or an odd number of
coordinates) and an annotation with no usable part left is dropped, box included, and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

ON_BAD_MASK = ("error", "skip")


class BadMaskError(ValueError):
    """A segmentation that cannot be decoded (the message names file, image and annotation)."""


# --------------------------------------------------------------------------- check / decode
def _polygon_problem(part: Any) -> str | None:
    """Why one polygon part is unusable, or None."""
    if not isinstance(part, list | tuple | np.ndarray):
        return f"a polygon part must be a list of coordinates, got {type(part).__name__}"
    if len(part) < 6:
        return f"a polygon part has {len(part)} coordinates (at least 6, 3 points, needed)"
    if len(part) % 2:
        return f"a polygon part has an odd number of coordinates ({len(part)})"
    try:
        arr = np.asarray(part, dtype=np.float64)
    except (TypeError, ValueError):
        return "a polygon part has non-numeric coordinates"
    if arr.ndim != 1 or not np.isfinite(arr).all():
        return "a polygon part has non-finite coordinates"
    return None


def check_segmentation(segm: Any, hw: tuple[int, int]) -> tuple[Any, list[str]]:
    """Validate one COCO `segmentation` for an image of `hw = (height, width)`.

    Returns `(usable, problems)`: `usable` is the segmentation with its bad polygon parts
    removed (None when nothing usable is left or the RLE is wrong), `problems` says what was
    wrong (empty when the segmentation is fine)."""
    h, w = int(hw[0]), int(hw[1])
    if isinstance(segm, list):
        problems = [p for p in (_polygon_problem(part) for part in segm) if p]
        good = [list(map(float, part)) for part in segm if _polygon_problem(part) is None]
        if not segm:
            problems.append("the polygon list is empty")
        return (good or None), problems
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if counts is None or size is None or len(size) != 2:
            return None, ["an RLE needs 'size' [height, width] and 'counts'"]
        if [int(size[0]), int(size[1])] != [h, w]:
            return None, [f"RLE size {list(size)} differs from the image's [{h}, {w}]"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                return None, [f"uncompressed RLE counts sum to {sum(counts)}, not {h} * {w}"]
        elif not isinstance(counts, str | bytes):
            return None, [f"RLE counts must be a string or a list, got {type(counts).__name__}"]
        return segm, []
    return None, [f"segmentation must be polygons (list) or RLE (dict), got {type(segm).__name__}"]


def decode_segmentation(segm: Any, hw: tuple[int, int]) -> np.ndarray:
    """mmdetection `_poly2mask`: a checked segmentation -> `[h, w] uint8` bitmap (0 / 1)."""
    h, w = int(hw[0]), int(hw[1])
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
        if isinstance(rle["counts"], str):
            rle = dict(size=rle["size"], counts=rle["counts"].encode("ascii"))
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


# ------------------------------------------------------------------------- resize / the grid
def nearest_index(src: int, dst: int) -> np.ndarray:
    """cv2 `INTER_NEAREST` source index of each of `dst` output positions along one axis."""
    idx = np.floor(np.arange(dst, dtype=np.float64) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


def roi_align_weights(lo: float, hi: float, cells: int, size: int, first: int, count: int):
    """`[cells, count]` float64 weights of pixels `first .. first + count - 1` of an axis of
    `size` pixels for mmcv / torchvision RoIAlign (`aligned=True`, `sampling_ratio=0`) of the
    interval `[lo, hi]` (continuous px) into `cells` bins: bin value = weights @ column.

    Rules (mmcv `roi_align` forward, one axis): samples at `lo - 0.5 + (i + (k + 0.5) / n) *
    bin` (pixel-index coordinates), `n = ceil((hi - lo) / cells)`; a sample below -1 or above
    `size` adds 0 but counts; others are clamped to 0 and use pixel `size - 1` alone at the end.
    """
    length = hi - lo
    n = max(int(math.ceil(length / cells)), 1)
    bin_size = length / cells
    i = np.arange(cells, dtype=np.float64)[:, None]
    k = np.arange(n, dtype=np.float64)[None, :]
    y = (lo - 0.5) + i * bin_size + (k + 0.5) * bin_size / n  # [cells, n]
    inside = (y >= -1.0) & (y <= size)
    y = np.maximum(y, 0.0)
    low = np.floor(y)
    at_end = low >= size - 1
    low = np.where(at_end, size - 1, low)
    y = np.where(at_end, low, y)
    frac = y - low
    high = np.where(at_end, low, low + 1)
    out = np.zeros((cells, count), np.float64)
    rows = np.broadcast_to(np.arange(cells)[:, None], y.shape)
    for idx, wgt in ((low, 1.0 - frac), (high, frac)):
        j = idx.astype(np.int64) - first
        ok = inside & (j >= 0) & (j < count)
        np.add.at(out, (rows[ok], j[ok]), wgt[ok] / n)
    return out


def mask_grid(
    bitmap: np.ndarray,
    box: Sequence[float],
    resized_hw: tuple[int, int],
    canvas_hw: tuple[int, int],
    flipped: bool,
    grid: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One GT's mask grid from its original-resolution bitmap (see the module docstring).

    Args:
      bitmap: `[h0, w0] uint8` 0 / 1, the decoded segmentation at the json's size.
      box: the GT box `xyxy` in resized (and, if `flipped`, flipped) canvas pixels.
      resized_hw: (h, w) of the resized image; canvas_hw: (H, W) of the padded canvas.
      flipped: the image was flipped horizontally after resizing.
      grid: M, cells per side.
    Returns:
      `(values [M, M] uint8 (round(255 * RoIAlign value)), region [4] float32 xyxy)`.
    """
    h0, w0 = bitmap.shape
    rh, rw = int(resized_hw[0]), int(resized_hw[1])
    H, W = int(canvas_hw[0]), int(canvas_hw[1])
    iy, ix = nearest_index(h0, rh), nearest_index(w0, rw)
    rows_any, cols_any = bitmap.any(axis=1), bitmap.any(axis=0)
    ys, xs = np.flatnonzero(rows_any[iy]), np.flatnonzero(cols_any[ix])
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (len(ys) and len(xs)):
        region = np.array([x1 - 1.0, y1 - 1.0, x2 + 1.0, y2 + 1.0], np.float32)
        return np.zeros((grid, grid), np.uint8), region
    # window [wy0, wy1) x [wx0, wx1) of the resized (unflipped) bitmap holding the mask
    wy0, wy1 = int(ys[0]), int(ys[-1]) + 1
    wx0, wx1 = int(xs[0]), int(xs[-1]) + 1
    fx0, fx1 = (rw - wx1, rw - wx0) if flipped else (wx0, wx1)  # the window on the canvas
    region = np.array(
        [min(x1, fx0) - 1.0, min(y1, wy0) - 1.0, max(x2, fx1) + 1.0, max(y2, wy1) + 1.0]
    )
    ay = roi_align_weights(region[1], region[3], grid, H, wy0, wy1 - wy0)
    ax = roi_align_weights(region[0], region[2], grid, W, fx0, fx1 - fx0)
    if flipped:
        ax = ax[:, ::-1]  # canvas column fx0 + j is resized column wx1 - 1 - j
    # the nearest rescale only repeats source rows / columns: fold the weights onto them
    ay0, sy = _fold(ay, iy[wy0:wy1])
    ax0, sx = _fold(ax, ix[wx0:wx1])
    src = bitmap[sy : sy + ay0.shape[1], sx : sx + ax0.shape[1]].astype(np.float32)
    values = ay0.astype(np.float32) @ src @ ax0.astype(np.float32).T
    out = np.clip(np.floor(values * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return out, region.astype(np.float32)


def _fold(weights: np.ndarray, src_index: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum the columns of `weights [cells, n]` that read the same source pixel (`src_index
    [n]`, non-decreasing): `([cells, k] over source pixels first .. first + k - 1, first)`."""
    starts = np.flatnonzero(np.r_[True, src_index[1:] != src_index[:-1]])
    first = int(src_index[0])
    out = np.zeros((weights.shape[0], int(src_index[-1]) - first + 1), weights.dtype)
    out[:, src_index[starts] - first] = np.add.reduceat(weights, starts, axis=1)
    return out, first


def resized_bitmap(
    bitmap: np.ndarray, resized_hw: tuple[int, int], canvas_hw: tuple[int, int], flipped: bool
) -> np.ndarray:
    """mmdetection's full-canvas bitmap `[H, W] uint8` (nearest rescale, flip, pad): the
    reference `mask_grid` is measured against (tests, benchmarks), too large to batch."""
    rh, rw = int(resized_hw[0]), int(resized_hw[1])
    out = np.zeros(tuple(int(v) for v in canvas_hw), np.uint8)
    res = bitmap[np.ix_(nearest_index(bitmap.shape[0], rh), nearest_index(bitmap.shape[1], rw))]
    out[:rh, :rw] = res[:, ::-1] if flipped else res
    return out


def encode_rle(masks: np.ndarray) -> list[dict]:
    """`[N, h, w]` bool masks -> COCO compressed RLEs (`counts` as str, json-ready), for
    pycocotools' segm evaluation."""
    masks = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(masks)
    return [
        dict(size=[int(v) for v in r["size"]], counts=r["counts"].decode("ascii")) for r in rles
    ]

"""mmdetection 2.x `MaxIoUAssigner`, vectorized with static shapes.

Encoding of the assignment (`assigned [N] int32`):
  `k >= 0`  positive, matched to GT `k` (an index into the padded GT array, always a valid GT);
  `NEGATIVE = -1` background; `IGNORE = -2` neither (IoU between the thresholds, or
  overlapping an ignore box by more than `ignore_iof_thr`).
mmdetection's own encoding is `k + 1` / `0` / `-1`; `to_mmdet_encoding` converts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from fgd_jax.ops.boxes import box_iou
from fgd_jax.ops.dtypes import float_dtype

NEGATIVE = -1
IGNORE = -2


def max_iou_assign(
    anchors: Array,
    gt: Array,
    gt_valid: Array,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    ignore_iof_thr: float = -1.0,
    anchor_valid: Array | None = None,
) -> tuple[Array, Array]:
    """Assign each anchor to a GT (or background / ignore) exactly as mmdet `MaxIoUAssigner`.

    Args:
      anchors: `[N, 4]` float32 xyxy. gt: `[G, 4]` float32 xyxy (padded); gt_valid: `[G]` bool.
      pos_iou_thr: positive if max IoU >= this. neg_iou_thr: negative if `0 <= max IoU < thr`
        (or `lo <= max IoU < hi` for a tuple).
      min_pos_iou, match_low_quality, gt_max_assign_all: mmdetection's low-quality matching: for
        GT i = 0..G-1 with max IoU >= min_pos_iou, every anchor whose IoU with GT i equals that
        max (or only the first one, if not gt_max_assign_all) becomes positive for GT i; a later
        GT overrides an earlier one.
      ignore_boxes `[I, 4]`, ignore_valid `[I]`, ignore_iof_thr: when `ignore_iof_thr > 0`,
        anchors whose IoF with a valid ignore box exceeds it get IoU -1 with every GT (ignored).
      anchor_valid: optional `[N]` bool; invalid anchors are IGNORE and never counted in the
        per-GT max (mmdet's `anchor_inside_flags` use).
    Returns:
      assigned: `[N]` int32 (see the module docstring); max_overlaps: `[N]` float32, the max IoU
      over valid GTs (0 when there is no valid GT, -1 for ignore-box anchors).
    """
    dt = float_dtype(anchors, gt)
    anchors = jnp.asarray(anchors, dt)
    gt = jnp.asarray(gt, dt)
    gt_valid = jnp.asarray(gt_valid, bool)
    if anchors.ndim != 2 or gt.ndim != 2 or gt_valid.shape != gt.shape[:1]:
        raise ValueError(
            "fgd_jax.ops.assign.max_iou_assign: expected anchors [N, 4], gt [G, 4], gt_valid [G];"
            f" got {anchors.shape}, {gt.shape}, {gt_valid.shape}"
        )
    n, g = anchors.shape[0], gt.shape[0]
    if g == 0:
        return jnp.full((n,), NEGATIVE, jnp.int32), jnp.zeros((n,), dt)

    overlaps = box_iou(gt, anchors)  # [G, N]
    if ignore_boxes is not None and ignore_iof_thr > 0:
        iof = box_iou(anchors, jnp.asarray(ignore_boxes, dt), mode="iof")  # [N, I]
        if ignore_valid is not None:
            iof = jnp.where(jnp.asarray(ignore_valid, bool)[None, :], iof, -1.0)
        ignored = jnp.max(iof, axis=1, initial=-1.0) > ignore_iof_thr
        overlaps = jnp.where(ignored[None, :], -1.0, overlaps)
    if anchor_valid is not None:
        anchor_valid = jnp.asarray(anchor_valid, bool)
        # -inf: never equal to a GT's max, never >= any threshold, never counted in a max.
        overlaps = jnp.where(anchor_valid[None, :], overlaps, -jnp.inf)
    # Padded GTs: -inf, so they never win a max and never count.
    overlaps = jnp.where(gt_valid[:, None], overlaps, -jnp.inf)

    max_overlaps = jnp.max(overlaps, axis=0)  # [N]
    argmax_overlaps = jnp.argmax(overlaps, axis=0).astype(jnp.int32)
    gt_max = jnp.max(overlaps, axis=1)  # [G]

    assigned = jnp.full((n,), IGNORE, jnp.int32)
    if isinstance(neg_iou_thr, tuple | list):
        lo, hi = neg_iou_thr
        neg = (max_overlaps >= lo) & (max_overlaps < hi)
    else:
        neg = (max_overlaps >= 0) & (max_overlaps < neg_iou_thr)
    assigned = jnp.where(neg, NEGATIVE, assigned)
    assigned = jnp.where(max_overlaps >= pos_iou_thr, argmax_overlaps, assigned)

    if match_low_quality:
        gt_ok = gt_valid & (gt_max >= min_pos_iou)  # [G]
        if gt_max_assign_all:
            hit = overlaps == gt_max[:, None]
        else:
            first = jnp.argmax(overlaps, axis=1)  # [G]
            hit = jnp.arange(n)[None, :] == first[:, None]
        hit = hit & gt_ok[:, None]  # [G, N]
        # The last GT (highest index) that hits an anchor wins, as in mmdet's loop.
        last = (g - 1 - jnp.argmax(hit[::-1], axis=0)).astype(jnp.int32)
        assigned = jnp.where(jnp.any(hit, axis=0), last, assigned)

    any_gt = jnp.any(gt_valid)
    assigned = jnp.where(any_gt, assigned, NEGATIVE)
    if anchor_valid is not None:
        assigned = jnp.where(anchor_valid, assigned, IGNORE)
        max_overlaps = jnp.where(anchor_valid, max_overlaps, 0.0)
    max_overlaps = jnp.where(any_gt, max_overlaps, 0.0)
    return assigned, max_overlaps


def batched_max_iou_assign(
    anchors: Array,
    gt: Array,
    gt_valid: Array,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    ignore_iof_thr: float = -1.0,
    anchor_valid: Array | None = None,
) -> tuple[Array, Array]:
    """`max_iou_assign` over a batch.

    anchors: `[N, 4]` (shared by all images) or `[B, N, 4]`; gt `[B, G, 4]`; gt_valid `[B, G]`;
    ignore_boxes `[B, I, 4]`, ignore_valid `[B, I]`, anchor_valid `[B, N]` when given.
    Returns `(assigned [B, N] int32, max_overlaps [B, N] float32)`.
    """
    dt = float_dtype(anchors, gt)
    anchors = jnp.asarray(anchors, dt)
    extra = {}
    if ignore_boxes is not None:
        extra["ignore_boxes"] = jnp.asarray(ignore_boxes, dt)
        if ignore_valid is not None:
            extra["ignore_valid"] = jnp.asarray(ignore_valid, bool)
    if anchor_valid is not None:
        extra["anchor_valid"] = jnp.asarray(anchor_valid, bool)

    def one(a, g, v, ex):
        return max_iou_assign(
            a,
            g,
            v,
            pos_iou_thr,
            neg_iou_thr,
            min_pos_iou,
            match_low_quality,
            gt_max_assign_all,
            ignore_iof_thr=ignore_iof_thr,
            **ex,
        )

    a_axis = 0 if anchors.ndim == 3 else None
    return jax.vmap(one, in_axes=(a_axis, 0, 0, 0))(anchors, gt, gt_valid, extra)


def to_mmdet_encoding(assigned: Array) -> Array:
    """Our encoding -> mmdetection's `gt_inds` (k + 1 positive, 0 negative, -1 ignore)."""
    return jnp.where(assigned >= 0, assigned + 1, jnp.where(assigned == NEGATIVE, 0, -1))


# ------------------------------------------------------------------------------------ ATSS
ATSS_INF = 100000000.0  # mmdetection's ATSSAssigner INF (distance of ignored anchors)


def atss_assign(
    anchors: Array,
    num_level_anchors: tuple[int, ...] | list[int],
    gt: Array,
    gt_valid: Array,
    topk: int = 9,
    anchor_valid: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    ignore_iof_thr: float = -1.0,
    center_eps: float = 0.01,
) -> Array:
    """mmdetection 2.11 `ATSSAssigner.assign` of ONE image, static shapes.

    For each valid GT: on every level the `min(topk, n_l)` anchors whose centres are closest
    (Euclidean) to the GT centre are candidates; a candidate is positive when its IoU with the
    GT is `>= mean + std` of the candidates' IoUs (std unbiased, as torch's `std`) and its
    centre lies inside the GT by more than `center_eps` pixels on every side
    (`min(l, t, r, b) > 0.01`). An anchor positive for several GTs takes the one with the
    highest IoU (the first GT on ties).

    Args:
      anchors: `[N, 4]` xyxy, levels concatenated finest first; num_level_anchors: the static
        per-level counts (sum N).
      gt: `[G, 4]` xyxy (padded); gt_valid: `[G]` bool (padded GTs are never assigned).
      anchor_valid: optional `[N]` bool; invalid anchors are left out altogether (mmdetection
        drops the anchors outside `inside_flags` before assigning, so a level then offers
        `min(topk, valid anchors)` candidates) and come back IGNORE.
      ignore_boxes `[I, 4]`, ignore_valid `[I]`, ignore_iof_thr: when `ignore_iof_thr > 0`,
        anchors whose IoF with a valid ignore box exceeds it get distance `ATSS_INF` to every GT
        and start as IGNORE (a positive match still overrides, as in mmdetection).
    Returns: assigned `[N] int32` (module docstring: `k >= 0` GT index, NEGATIVE, IGNORE).
    With no valid GT every (valid) anchor is NEGATIVE.
    """
    dt = float_dtype(anchors, gt)
    anchors = jnp.asarray(anchors, dt)
    gt = jnp.asarray(gt, dt)
    gt_valid = jnp.asarray(gt_valid, bool)
    n, g = anchors.shape[0], gt.shape[0]
    if sum(num_level_anchors) != n:
        raise ValueError(
            f"fgd_jax.ops.assign.atss_assign: num_level_anchors {tuple(num_level_anchors)} "
            f"do not sum to the {n} anchors"
        )
    if g == 0:
        return jnp.full((n,), NEGATIVE, jnp.int32)
    overlaps = box_iou(anchors, gt)  # [N, G]
    acx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    acy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    gcx = (gt[:, 0] + gt[:, 2]) / 2.0
    gcy = (gt[:, 1] + gt[:, 3]) / 2.0
    dist = jnp.sqrt((acx[:, None] - gcx[None, :]) ** 2 + (acy[:, None] - gcy[None, :]) ** 2)
    init = jnp.full((n,), NEGATIVE, jnp.int32)
    if ignore_boxes is not None and ignore_iof_thr > 0:
        iof = box_iou(anchors, jnp.asarray(ignore_boxes, dt), mode="iof")  # [N, I]
        if ignore_valid is not None:
            iof = jnp.where(jnp.asarray(ignore_valid, bool)[None, :], iof, -1.0)
        ignored = jnp.max(iof, axis=1, initial=-1.0) > ignore_iof_thr
        dist = jnp.where(ignored[:, None], ATSS_INF, dist)
        init = jnp.where(ignored, IGNORE, init)
    if anchor_valid is not None:
        anchor_valid = jnp.asarray(anchor_valid, bool)
        dist = jnp.where(anchor_valid[:, None], dist, jnp.inf)

    cand, cand_ok = [], []
    start = 0
    for count in num_level_anchors:
        k = min(topk, count)
        if k > 0:
            # lax.top_k keeps the lower index first among equal distances
            neg_d, idx = jax.lax.top_k(-dist[start : start + count].T, k)  # [G, k]
            cand.append(idx + start)
            cand_ok.append(jnp.isfinite(neg_d))
        start += count
    cand = jnp.concatenate(cand, axis=1)  # [G, K]
    ok = jnp.concatenate(cand_ok, axis=1)
    okf = ok.astype(dt)
    cand_iou = jnp.take_along_axis(overlaps.T, cand, axis=1)  # [G, K]
    cnt = jnp.sum(okf, axis=1)
    mean = jnp.sum(cand_iou * okf, axis=1) / jnp.maximum(cnt, 1.0)
    var = jnp.sum(((cand_iou - mean[:, None]) * okf) ** 2, axis=1) / (cnt - 1.0)
    std = jnp.where(cnt > 1, jnp.sqrt(jnp.maximum(var, 0.0)), jnp.nan)  # torch: nan for 1
    is_pos = cand_iou >= (mean + std)[:, None]

    cx, cy = acx[cand], acy[cand]  # [G, K]
    inside = jnp.min(
        jnp.stack([cx - gt[:, 0:1], cy - gt[:, 1:2], gt[:, 2:3] - cx, gt[:, 3:4] - cy], axis=-1),
        axis=-1,
    )
    is_pos = is_pos & (inside > center_eps) & ok & gt_valid[:, None]

    pos = jnp.zeros((g, n), bool)
    pos = pos.at[jnp.arange(g)[:, None], cand].max(is_pos)  # [G, N]
    ov = jnp.where(pos.T, overlaps, -ATSS_INF)  # [N, G]
    best = jnp.argmax(ov, axis=1).astype(jnp.int32)  # first GT on ties, as torch's max
    assigned = jnp.where(jnp.any(pos, axis=0), best, init)
    assigned = jnp.where(jnp.any(gt_valid), assigned, NEGATIVE)
    if anchor_valid is not None:
        assigned = jnp.where(anchor_valid, assigned, IGNORE)
    return assigned


def point_assign(
    points: Array,
    point_strides: Array,
    gt: Array,
    gt_valid: Array,
    scale: float = 4.0,
    pos_num: int = 1,
    point_valid: Array | None = None,
) -> Array:
    """mmdetection 2.x `PointAssigner` (RepPoints' init stage), static shapes.

    Each valid GT box gets the FPN level `int((log2(w / scale) + log2(h / scale)) / 2)`
    (truncated toward zero, clamped to the levels present), and the `pos_num` points of that
    level nearest to its centre in the distance `|(p - c) / (w, h)|` (w, h clamped at 1e-6)
    become its positives. GTs are taken in order and a point taken by an earlier GT moves to a
    later one only when strictly closer to it, so a point ends at the first GT of least
    distance among those that picked it. Every other point is negative.

    Args:
      points: `[N, 2]` (x, y) pixels; point_strides: `[N]` each point's level stride (a power
        of 2). gt: `[G, 4]` xyxy (padded), gt_valid: `[G]` bool.
      point_valid: optional `[N]` bool; invalid points are never picked and come out
        `IGNORE` (mmdetection assigns only the points inside the padded image).
    Returns: `[N]` int32: the GT index on positives, `NEGATIVE` elsewhere (`IGNORE` on
      invalid points). Among equally near points the lower index is picked (`lax.top_k`);
      torch's `topk` order among equal distances is unspecified.
    """
    dt = float_dtype(points, gt)
    points = jnp.asarray(points, dt)
    gt = jnp.asarray(gt, dt)
    gt_valid = jnp.asarray(gt_valid, bool)
    n, g = points.shape[0], gt.shape[0]
    valid = jnp.ones((n,), bool) if point_valid is None else jnp.asarray(point_valid, bool)
    if g == 0:
        return jnp.where(valid, NEGATIVE, IGNORE).astype(jnp.int32)
    lvl = jnp.round(jnp.log2(jnp.asarray(point_strides, dt))).astype(jnp.int32)  # [N]
    big = jnp.iinfo(jnp.int32).max
    lvl_min = jnp.min(jnp.where(valid, lvl, big))
    lvl_max = jnp.max(jnp.where(valid, lvl, -big))
    center = (gt[:, :2] + gt[:, 2:]) / 2  # [G, 2]
    wh = jnp.maximum(gt[:, 2:] - gt[:, :2], 1e-6)
    gt_lvl = jnp.trunc((jnp.log2(wh[:, 0] / scale) + jnp.log2(wh[:, 1] / scale)) / 2)
    gt_lvl = jnp.clip(gt_lvl.astype(jnp.int32), lvl_min, lvl_max)  # [G]
    dist = jnp.linalg.norm((points[None] - center[:, None]) / wh[:, None], axis=-1)  # [G, N]
    on_level = (lvl[None] == gt_lvl[:, None]) & valid[None] & gt_valid[:, None]
    dist = jnp.where(on_level, dist, jnp.inf)
    k = min(pos_num, n)
    neg_top, idx = jax.lax.top_k(-dist, k)  # [G, k] nearest first
    picked = jnp.zeros((g, n), bool).at[jnp.arange(g)[:, None], idx].set(jnp.isfinite(neg_top))
    cand = jnp.where(picked, dist, jnp.inf)  # [G, N]
    best = jnp.argmin(cand, axis=0).astype(jnp.int32)  # first GT on ties
    hit = jnp.isfinite(jnp.min(cand, axis=0))
    assigned = jnp.where(hit, best, NEGATIVE)
    return jnp.where(valid, assigned, IGNORE).astype(jnp.int32)

"""SimOTA assignment (YOLOX) with mmdetection 2.x semantics, in static shapes.

mmdetection `SimOTAAssigner._assign` (2.19-2.28; 3.3 computes the same numbers, its head takes
the square root of the scores before the call instead of inside it):
- a prior (centre `(x, y)`, stride `(sx, sy)`; YOLOX's head passes centres with a half-stride
  offset) is *in* a GT box when its centre lies strictly inside the box, and *in the centre
  region* when strictly inside the square of half-side `center_radius * stride` around the
  box centre. Priors in neither region of any GT are not candidates at all (mmdet drops those
  rows); here their cost is +inf.
- cost `[N, G]` = `cls_weight * sum_c BCE(sqrt(score_nc), onehot(label_g)_c)` (torch's BCE:
  logs clamped at -100) `+ iou_weight * -log(IoU + 1e-7)` `+ 1e5` where the prior is not in
  both the box and the centre region of that GT. IoU between the decoded boxes and the GTs
  (mmdet `bbox_overlaps`, union clamped at 1e-6).
- dynamic k per GT: `max(int(sum of its top-min(candidate_topk, N_cand) IoUs), 1)` over the
  candidate priors; the GT takes its k lowest-cost candidates (k <= candidate_topk, so a
  static top-`candidate_topk` with the ranks past k masked).
- a prior taken by several GTs goes to the GT of lowest cost over ALL GTs (not only those
  that took it: mmdet's `torch.min(cost[prior, :])`; first GT on equal cost).
Padded GTs (`gt_valid=False`) are never in any region, have cost +inf and k = 0.

Ties: mmdet's `torch.topk(largest=False)` picks an unspecified prior among equal costs. Costs
near 1e5 (priors outside the box-and-centre region, taken when a GT has fewer such priors
than its k) are rounded to float32's 0.0078 spacing there, so such ties happen in float32;
`lax.top_k` keeps the lower index first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from fgd_jax.ops.boxes import box_iou
from fgd_jax.ops.dtypes import float_dtype

INF_COST = 100000.0  # mmdet's INF for pairs outside the box-and-centre region


def in_box_and_center(
    priors: Array, gt_boxes: Array, gt_valid: Array, center_radius: float = 2.5
) -> tuple[Array, Array]:
    """mmdet `get_in_gt_and_in_center_info` without dropping rows.

    Args: priors `[N, 4]` (x, y, stride_x, stride_y); gt_boxes `[G, 4]` xyxy; gt_valid `[G]`.
    Returns: in_gt `[N, G]` bool (centre strictly inside the box), in_ct `[N, G]` bool (strictly
      inside the centre square), both False for padded GTs.
    """
    x, y = priors[:, 0:1], priors[:, 1:2]
    sx, sy = priors[:, 2:3], priors[:, 3:4]
    g = gt_boxes[None]
    d = jnp.stack([x - g[..., 0], y - g[..., 1], g[..., 2] - x, g[..., 3] - y], -1)
    in_gt = (d.min(-1) > 0) & gt_valid[None]
    cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0
    cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0
    cd = jnp.stack(
        [
            x - (cx - center_radius * sx),
            y - (cy - center_radius * sy),
            (cx + center_radius * sx) - x,
            (cy + center_radius * sy) - y,
        ],
        -1,
    )
    in_ct = (cd.min(-1) > 0) & gt_valid[None]
    return in_gt, in_ct


def _bce_prob(p: Array, t: float) -> Array:
    """torch `F.binary_cross_entropy(p, t)` for a constant target 0 or 1 (logs clamped -100)."""
    if t == 1.0:
        return -jnp.maximum(jnp.log(p), -100.0)
    return -jnp.maximum(jnp.log1p(-p), -100.0)


def simota_cost(
    pred_scores: Array,
    priors: Array,
    decoded_boxes: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    center_radius: float = 2.5,
    iou_weight: float = 3.0,
    cls_weight: float = 1.0,
    eps: float = 1e-7,
) -> tuple[Array, Array, Array]:
    """The SimOTA cost matrix of one image.

    Args: pred_scores `[N, C]` in [0, 1] (YOLOX: sigmoid(cls) * sigmoid(obj)); priors `[N, 4]`
      (x, y, sx, sy); decoded_boxes `[N, 4]` xyxy; gt_boxes `[G, 4]`; gt_labels `[G]` int;
      gt_valid `[G]` bool.
    Returns: cost `[N, G]` (+inf for non-candidate priors and padded GTs), ious `[N, G]`
      (0 for non-candidates and padded GTs), candidate `[N]` bool (in a box or a centre
      region of some GT).
    """
    dt = float_dtype(pred_scores, decoded_boxes)
    pred_scores = jnp.asarray(pred_scores, dt)
    gt_valid = jnp.asarray(gt_valid, bool)
    in_gt, in_ct = in_box_and_center(
        jnp.asarray(priors, dt), jnp.asarray(gt_boxes, dt), gt_valid, center_radius
    )
    candidate = jnp.any(in_gt | in_ct, axis=1)
    ious = box_iou(jnp.asarray(decoded_boxes, dt), jnp.asarray(gt_boxes, dt))
    iou_cost = -jnp.log(ious + eps)
    s = jnp.sqrt(pred_scores)
    neg = _bce_prob(s, 0.0)  # [N, C]
    pos = _bce_prob(s, 1.0)
    c = pred_scores.shape[-1]
    lab = jnp.clip(jnp.asarray(gt_labels, jnp.int32), 0, c - 1)
    cls_cost = neg.sum(-1, keepdims=True) - neg[:, lab] + pos[:, lab]  # [N, G]
    cost = cls_cost * cls_weight + iou_cost * iou_weight + (~(in_gt & in_ct)) * INF_COST
    ok = candidate[:, None] & gt_valid[None]
    cost = jnp.where(ok, cost, jnp.inf)
    ious = jnp.where(ok, ious, 0.0)
    return cost, ious, candidate


def dynamic_k_matching(cost: Array, ious: Array, candidate_topk: int = 10) -> tuple[Array, Array]:
    """mmdet `SimOTAAssigner.dynamic_k_matching` on a static `[N, G]` cost (+inf: never
    matched) and IoU matrix (0 outside the candidates).

    Returns: assigned `[N]` int32 (GT index, -1 background), matched_iou `[N]` (IoU with the
      assigned GT, 0 for background).
    """
    n, g = cost.shape
    k = min(candidate_topk, n)
    top_ious, _ = jax.lax.top_k(ious.T, k)  # [G, k]
    dyn_k = jnp.maximum(jnp.floor(top_ious.sum(-1)).astype(jnp.int32), 1)  # [G]
    neg_cost, idx = jax.lax.top_k(-cost.T, k)  # [G, k] lowest cost first
    take = (jnp.arange(k)[None] < dyn_k[:, None]) & jnp.isfinite(neg_cost)
    gt_idx = jnp.broadcast_to(jnp.arange(g)[:, None], (g, k))
    match = jnp.zeros((n, g), jnp.int32).at[idx, gt_idx].add(take.astype(jnp.int32))
    match = match > 0
    multi = match.sum(1) > 1
    best = jnp.argmin(cost, axis=1)
    match = jnp.where(multi[:, None], jnp.arange(g)[None] == best[:, None], match)
    fg = match.any(1)
    assigned = jnp.where(fg, jnp.argmax(match, axis=1), -1).astype(jnp.int32)
    matched_iou = jnp.sum(jnp.where(match, ious, 0.0), axis=1)
    return assigned, matched_iou


def simota_assign(
    pred_scores: Array,
    priors: Array,
    decoded_boxes: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    center_radius: float = 2.5,
    candidate_topk: int = 10,
    iou_weight: float = 3.0,
    cls_weight: float = 1.0,
) -> tuple[Array, Array]:
    """SimOTA for one image (see the module docstring). Shapes as `simota_cost`.

    Returns: assigned `[N]` int32 (GT index, -1 background; mmdet's `gt_inds - 1`),
      matched_iou `[N]` (mmdet's `max_overlaps` on the positives; 0 elsewhere).
    """
    cost, ious, _ = simota_cost(
        pred_scores,
        priors,
        decoded_boxes,
        gt_boxes,
        gt_labels,
        gt_valid,
        center_radius,
        iou_weight,
        cls_weight,
    )
    return dynamic_k_matching(cost, ious, candidate_topk)

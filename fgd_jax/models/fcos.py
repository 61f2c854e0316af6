"""FCOS with mmdetection 2.x (2.11) semantics, NHWC, Flax Linen, static shapes under jit.

Pieces (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (caffe-style ResNet, C2..C5) -> `neck` (FPN, start_level 1, P6/P7 from P5 with a
  ReLU before P7) -> `bbox_head` (`FCOSHead`, one set of weights for every level plus one
  learnable `scales_{l}/scale` per level).
- Points: `(x * stride + stride // 2, y * stride + stride // 2)` (mmdetection); index
  `y * W + x` per level, levels concatenated finest first.
- Training (`fcos_loss`): a point is a candidate of a GT if it lies strictly inside the GT (or
  inside its centre region of radius `center_sample_radius * stride` with centre sampling) and
  its largest distance to the GT's sides is inside the level's regress range (both bounds
  inclusive); the smallest-area candidate wins (first GT on ties). Focal loss over all points
  / num_pos; IoU/GIoU loss on positives weighted by the centerness target / sum of centerness
  targets; BCE on the centerness / num_pos.
- Inference (`fcos_postprocess`): mmdetection 2.11 `FCOSHead._get_bboxes`: per level the top
  `nms_pre` points by `max_c(sigmoid(cls) * sigmoid(ctr))`, decode + clip to `img_shape`, divide by
  `scale_factor`; then `multiclass_nms(score_factors=centerness)`: a (point, class) pair is kept
  when `sigmoid(cls) > score_thr` and scored `sigmoid(cls) * sigmoid(ctr)`, class-wise NMS,
  `max_per_img` best. `score_style='torchvision'` instead follows torchvision's
  `FCOS.postprocess_detections` (score `sqrt(sigmoid(cls) * sigmoid(ctr))`, threshold on that
  score, top `nms_pre` pairs per level).

Head outputs (`__call__`): `bbox_preds` are the distances (left, top, right, bottom) after the
scale and `exp` (plain) or `relu` (`norm_on_bbox`, then in units of the level's stride; the
postprocess multiplies by the stride, as mmdetection does at test time), so they do not depend
on `train`.

Input mean (`input_shift`): our 'caffe' data pipeline subtracts one BGR mean,
`config.CAFFE_PIXEL_MEAN` = (103.53, 116.28, 123.675) (mmdetection's FCOS-with-tricks configs),
but the plain mmdetection FCOS configs (R50/R101 `fcos_r*_caffe_fpn_gn-head*`) normalise with
(102.9801, 115.9465, 122.7717). A model config with `pixel_mean` (the mean its weights expect)
and `data_pixel_mean` (the mean the pipeline subtracted) adds `data_pixel_mean - pixel_mean`
to the image inside each image's `img_shape` region; the canvas padding stays 0, as
mmdetection pads after `Normalize`. The input then equals mmdetection's (up to float
rounding). `extract_feat` without `img_shape` shifts the whole canvas; the FGD distiller calls
the teacher that way, and FGD feeds the teacher the student's image unchanged (the original),
so a distillation teacher's config sets `pixel_mean` to the student's (zero shift), as
configs/fcos_r101_r50.py does.

Loss normalisation across devices: mmdetection 2.11 divides by `max(reduce_mean(num_pos), 1)`
and `max(reduce_mean(sum centerness targets), 1e-6)` and DDP averages gradients, which equals
normalising the global batch by its global counts (what `fcos_loss` does); only the floor
differs (`max(total, 1)` here, `max(total, num_gpus)` there; both only matter without any
positive).

Points on the canvas padding: mmdetection computes the focal loss over every point of its
batch tensor (images padded to a multiple of 32, then to the largest image of the per-GPU
batch). Our canvases are fixed and larger, so with `size_divisor > 0` only the points inside
each image's own padded shape `ceil(img_shape / size_divisor) * size_divisor` count (0: every
canvas point counts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.models.dense_heads import (
    DenseTestCfg,
    flatten_levels,
    point_valid_flags,
    top_candidates,
)
from fgd_jax.models.layers import ConvModule, head_out_conv, head_tower
from fgd_jax.models.single_stage import SingleStageDetector
from fgd_jax.ops import anchors as anchor_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import nms as nms_ops

Array = jax.Array

INF = 1e8  # mmdetection's FCOS "infinity" (regress range upper bound, unmatched area)
DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))
LOSS_BBOX = ("giou", "iou")
SCORE_STYLES = ("mmdet", "torchvision")


# ------------------------------------------------------------------------------------ head
class Scale(nn.Module):
    """mmcv `Scale`: multiply by one learnable scalar `scale` (shape `()`, init `init_value`)."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (), jnp.float32)
        return x * scale.astype(x.dtype)


class FCOSHead(nn.Module):
    """mmdetection 2.11 `FCOSHead` (`AnchorFreeHead` towers, GN, per-level `Scale`).

    Attributes:
      num_classes: foreground classes (sigmoid classifier, no background channel).
      feat_channels, stacked_convs: tower width / depth (3x3 conv -> GN -> ReLU).
      strides: one per level (only their count matters here).
      num_groups: GroupNorm groups.
      conv_bias: bias in the tower convs (mmdetection `conv_bias`: 'auto' = False with GN;
        the FGD student config sets True).
      norm_on_bbox: regression `relu(scale * x)` in units of the stride instead of
        `exp(scale * x)` pixels.
      centerness_on_reg: centerness from the regression tower (else the classification tower).
      use_scale: the learnable per-level `Scale` (False for torchvision's FCOS, which has none).
      prior_prob: initial foreground probability of `conv_cls` (bias init).
      in_channels: channels of the FPN maps (checked).
      regress_ranges: per level (lo, hi) of a positive's largest side distance, pixels.
      half_stride_offset: points at `x * stride + stride // 2` (mmdetection) or `x * stride`.
      center_sampling, center_sample_radius: positives only within `radius * stride` of the
        GT centre. loss_bbox: 'iou' (`-log IoU`) or 'giou'. focal_gamma, focal_alpha and the
        `loss_*_weight`s: the losses' settings (read by the detector).
    Call: tuple of NHWC maps `[B, H_l, W_l, in_ch]` -> (cls_scores `[B, H_l, W_l, C]` logits,
      bbox_preds `[B, H_l, W_l, 4]` distances >= 0, centernesses `[B, H_l, W_l, 1]` logits),
      each a tuple over levels, float32.
    """

    num_classes: int
    feat_channels: int = 256
    stacked_convs: int = 4
    strides: Sequence[int] = DEFAULT_STRIDES
    num_groups: int = 32
    conv_bias: bool = False
    norm_on_bbox: bool = False
    centerness_on_reg: bool = False
    use_scale: bool = True
    prior_prob: float = 0.01
    in_channels: int | None = None  # checked against the maps when set
    regress_ranges: Sequence[tuple[float, float]] = DEFAULT_REGRESS_RANGES
    half_stride_offset: bool = True
    center_sampling: bool = False
    center_sample_radius: float = 1.5
    loss_bbox: str = "iou"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_centerness_weight: float = 1.0
    dtype: Any = None

    @nn.compact
    def __call__(
        self, feats: Sequence[Array]
    ) -> tuple[tuple[Array, ...], tuple[Array, ...], tuple[Array, ...]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"FCOSHead: {len(feats)} feature maps but {len(self.strides)} strides")
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"FCOSHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config head.in_channels vs neck)"
            )
        init = nn.initializers.normal(0.01)

        def tower(prefix: str) -> list[ConvModule]:
            return head_tower(
                prefix,
                self.stacked_convs,
                self.feat_channels,
                dtype=self.dtype,
                kernel_init=init,
                norm="gn",
                num_groups=self.num_groups,
                use_bias=self.conv_bias,
            )

        def out_conv(features: int, bias: float, name: str) -> nn.Conv:
            return head_out_conv(features, bias, name, dtype=self.dtype, kernel_init=init)

        cls_convs, reg_convs = tower("cls_convs"), tower("reg_convs")
        bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
        conv_cls = out_conv(self.num_classes, bias_cls, "conv_cls")
        conv_reg = out_conv(4, 0.0, "conv_reg")
        conv_centerness = out_conv(1, 0.0, "conv_centerness")
        scales = (
            [Scale(1.0, name=f"scales_{i}") for i in range(len(self.strides))]
            if self.use_scale
            else None
        )
        cls_scores, bbox_preds, centernesses = [], [], []
        for lvl, x in enumerate(feats):
            c = r = x
            for conv in cls_convs:
                c = conv(c)
            for conv in reg_convs:
                r = conv(r)
            cls = conv_cls(c)
            cls_scores.append(cls.astype(dtypes.float_dtype(cls)))
            ctr = conv_centerness(r if self.centerness_on_reg else c)
            centernesses.append(ctr.astype(dtypes.float_dtype(ctr)))
            reg = conv_reg(r)
            if scales is not None:
                reg = scales[lvl](reg)
            reg = reg.astype(dtypes.float_dtype(reg))
            bbox_preds.append(nn.relu(reg) if self.norm_on_bbox else jnp.exp(reg))
        return tuple(cls_scores), tuple(bbox_preds), tuple(centernesses)


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class FCOSTrainCfg:
    """Training settings (model config `train_cfg`): `size_divisor` of the point valid flags
    (module docstring, "Points on the canvas padding")."""

    size_divisor: int = 32


@dataclasses.dataclass(frozen=True)
class FCOSTestCfg(DenseTestCfg):
    """`DenseTestCfg` plus `score_style`: 'mmdet' or 'torchvision' (module docstring)."""

    score_style: str = "mmdet"


_HEAD = FCOSHead(num_classes=1)  # the field defaults, read by the functions below
_TEST = FCOSTestCfg()


# ---------------------------------------------------------------------------------- points
def fcos_points(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = _HEAD.strides,
    half_stride_offset: bool = _HEAD.half_stride_offset,
) -> list[Array]:
    """Points per level: list of `[H_l * W_l, 2] float32` (x, y) pixels of the network input.

    `half_stride_offset`: `x * stride + stride // 2` (mmdetection 2.11) or `x * stride`
    (torchvision's FCOS anchors are centred on the grid corners).
    """
    pts = anchor_ops.multi_level_points([tuple(s) for s in feat_shapes], strides)
    if half_stride_offset:
        return pts
    return [p - float(int(s) // 2) for p, s in zip(pts, strides, strict=True)]


def _per_point(values: Sequence[Any], counts: Sequence[int]) -> Array:
    """Repeat one value per level over that level's points -> `[N, ...] float32`."""
    return jnp.concatenate(
        [
            jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n, *jnp.shape(v)))
            for v, n in zip(values, counts, strict=True)
        ],
        axis=0,
    )


# ---------------------------------------------------------------------------------- targets
def fcos_targets(
    points: Array,
    point_strides: Array,
    regress_ranges: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    center_sampling: bool = _HEAD.center_sampling,
    center_sample_radius: float = _HEAD.center_sample_radius,
) -> tuple[Array, Array]:
    """Targets of ONE image (vmap for a batch), mmdetection 2.11 `FCOSHead._get_target_single`.

    Args:
      points: `[N, 2]` (x, y) pixels; point_strides: `[N]` the stride of each point's level;
      regress_ranges: `[N, 2]` (lo, hi) of each point's level.
      gt_boxes: `[G, 4]` xyxy; gt_labels: `[G] int`; gt_valid: `[G] bool` (padding never wins).
    Returns: labels `[N] int32` (class, or `num_classes` for background) and bbox_targets
      `[N, 4]` (left, top, right, bottom) pixels to the assigned GT (to GT 0 for background,
      like mmdetection; callers use only the positives).
    """
    xs = points[:, 0][:, None]
    ys = points[:, 1][:, None]
    b = gt_boxes[None, :, :]
    left = xs - b[..., 0]
    top = ys - b[..., 1]
    right = b[..., 2] - xs
    bottom = b[..., 3] - ys
    bbox_targets = jnp.stack([left, top, right, bottom], axis=-1)  # [N, G, 4]
    if center_sampling:
        radius = (point_strides * center_sample_radius)[:, None]
        cx = (b[..., 0] + b[..., 2]) / 2
        cy = (b[..., 1] + b[..., 3]) / 2
        x_min = jnp.where(cx - radius > b[..., 0], cx - radius, b[..., 0])
        y_min = jnp.where(cy - radius > b[..., 1], cy - radius, b[..., 1])
        x_max = jnp.where(cx + radius > b[..., 2], b[..., 2], cx + radius)
        y_max = jnp.where(cy + radius > b[..., 3], b[..., 3], cy + radius)
        center = jnp.stack([xs - x_min, ys - y_min, x_max - xs, y_max - ys], axis=-1)
        inside = center.min(-1) > 0
    else:
        inside = bbox_targets.min(-1) > 0
    max_dist = bbox_targets.max(-1)
    in_range = (max_dist >= regress_ranges[:, 0:1]) & (max_dist <= regress_ranges[:, 1:2])
    areas = box_ops.box_area(gt_boxes)[None, :]
    cand = inside & in_range & gt_valid[None, :]
    areas = jnp.where(cand, areas, INF)
    idx = jnp.argmin(areas, axis=1)
    min_area = jnp.min(areas, axis=1)
    labels = jnp.where(min_area == INF, num_classes, gt_labels[idx]).astype(jnp.int32)
    targets = jnp.take_along_axis(bbox_targets, idx[:, None, None], axis=1)[:, 0]
    return labels, targets


def centerness_target(bbox_targets: Array) -> Array:
    """`sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))` for `[..., 4]` (l, t, r, b)."""
    lr = bbox_targets[..., jnp.array([0, 2])]
    tb = bbox_targets[..., jnp.array([1, 3])]
    return jnp.sqrt((lr.min(-1) / lr.max(-1)) * (tb.min(-1) / tb.max(-1)))


# ------------------------------------------------------------------------------------ loss
def fcos_loss(
    cls_scores: Array,
    bbox_preds: Array,
    centernesses: Array,
    points: Array,
    point_strides: Array,
    regress_ranges: Array,
    point_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    center_sampling: bool = _HEAD.center_sampling,
    center_sample_radius: float = _HEAD.center_sample_radius,
    norm_on_bbox: bool = _HEAD.norm_on_bbox,
    loss_bbox_type: str = _HEAD.loss_bbox,
    focal_gamma: float = _HEAD.focal_gamma,
    focal_alpha: float = _HEAD.focal_alpha,
    loss_cls_weight: float = _HEAD.loss_cls_weight,
    loss_bbox_weight: float = _HEAD.loss_bbox_weight,
    loss_centerness_weight: float = _HEAD.loss_centerness_weight,
    iou_eps: float = 1e-6,
) -> dict[str, Array]:
    """mmdetection 2.11 `FCOSHead.loss` over a global batch.

    Args:
      cls_scores: `[B, N, C]` logits; bbox_preds: `[B, N, 4]` distances (pixels, or strides
        with `norm_on_bbox`); centernesses: `[B, N]` logits (levels flattened).
      points: `[N, 2]`; point_strides: `[N]`; regress_ranges: `[N, 2]`.
      point_valid: `[B, N] bool` points that take part in the focal loss.
      gt_boxes `[B, G, 4]`, gt_labels `[B, G] int32`, gt_valid `[B, G] bool`.
      loss_bbox_type: 'giou' (`1 - GIoU`) or 'iou' (`-log(max(IoU, eps))`, mmdetection
        `IoULoss` mode 'log').
    Returns: {'loss_cls', 'loss_bbox', 'loss_centerness'} float32 scalars (float64 in a float64
      run).
    """
    if loss_bbox_type not in LOSS_BBOX:
        raise ValueError(f"fcos_loss: loss_bbox {loss_bbox_type!r} must be one of {LOSS_BBOX}")
    labels, targets = jax.vmap(
        lambda b, l, v: fcos_targets(
            points,
            point_strides,
            regress_ranges,
            b,
            l,
            v,
            num_classes=num_classes,
            center_sampling=center_sampling,
            center_sample_radius=center_sample_radius,
        )
    )(gt_boxes, gt_labels, gt_valid)
    if norm_on_bbox:
        targets = targets / point_strides[None, :, None]
    pos = labels < num_classes  # [B, N]
    dt = dtypes.float_dtype(cls_scores, bbox_preds, centernesses, gt_boxes)
    posf = pos.astype(dt)
    num_pos = jnp.maximum(jnp.sum(posf), 1.0)

    # background label num_classes -> an all-zero target row (memory-lean sum, issue 24)
    focal = loss_ops.sigmoid_focal_loss_sum(
        cls_scores, labels, point_valid.astype(dt), gamma=focal_gamma, alpha=focal_alpha
    )
    loss_cls = jnp.sum(focal) / num_pos

    # Off the positives the targets may be anything (even negative): replace them by a unit
    # box so neither the values nor the gradients can become nan; their weight is 0 anyway.
    safe_t = jnp.where(pos[..., None], targets, 1.0)
    safe_p = jnp.where(pos[..., None], bbox_preds.astype(dt), 1.0)
    ctr_t = jax.lax.stop_gradient(jnp.where(pos, centerness_target(safe_t), 0.0))
    pts = jnp.broadcast_to(points[None], safe_p.shape[:2] + (2,))
    pred_boxes = box_ops.distance2bbox(pts, safe_p)
    target_boxes = box_ops.distance2bbox(pts, safe_t)
    if loss_bbox_type == "giou":
        per_point = loss_ops.giou_loss(pred_boxes, target_boxes, eps=iou_eps)
    else:
        per_point = loss_ops.iou_loss(pred_boxes, target_boxes, mode="log", eps=iou_eps)
    ctr_denorm = jnp.maximum(jnp.sum(ctr_t), 1e-6)
    loss_bbox = jnp.sum(per_point * ctr_t) / ctr_denorm

    bce = loss_ops.binary_cross_entropy_with_logits(centernesses.astype(dt), ctr_t)
    loss_centerness = jnp.sum(bce * posf) / num_pos
    return dict(
        loss_cls=loss_cls_weight * loss_cls,
        loss_bbox=loss_bbox_weight * loss_bbox,
        loss_centerness=loss_centerness_weight * loss_centerness,
    )


# ------------------------------------------------------------------------------- inference
def fcos_postprocess(
    cls_scores: Sequence[Array],
    bbox_preds: Sequence[Array],
    centernesses: Sequence[Array],
    points: Sequence[Array],
    strides: Sequence[int],
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    norm_on_bbox: bool = _HEAD.norm_on_bbox,
    nms_pre: int = _TEST.nms_pre,
    score_thr: float = _TEST.score_thr,
    iou_threshold: float = _TEST.iou_threshold,
    max_per_img: int = _TEST.max_per_img,
    max_candidates: int = _TEST.max_candidates,
    score_style: str = _TEST.score_style,
) -> dict[str, Array]:
    """Detections of a batch (static shapes), see the module docstring for both styles.

    Args:
      cls_scores / bbox_preds / centernesses: per level `[B, H, W, C]` logits,
        `[B, H, W, 4]` distances (`__call__` outputs), `[B, H, W, 1]` logits.
      points: per level `[H*W, 2]`; strides: per level (multiplies the distances when
        `norm_on_bbox`). img_shape: `[B, 2]` (h, w) of the resized image; scale_factor:
        `[B, 4]` (w, h, w, h).
      nms_pre: 'mmdet': points kept per level before NMS; 'torchvision': (point, class)
        pairs kept per level (its `topk_candidates`).
      max_candidates ('mmdet'): the (point, class) pairs passed to NMS are the highest-scoring
        ones above `score_thr`; mmdetection passes all of them, the result is the same
        whenever the `max_per_img`-th kept detection is among the first `max_candidates`.
    Returns: dict(boxes `[B, K, 4]` xyxy in original-image pixels, scores `[B, K]`,
      labels `[B, K] int32` (-1 where invalid), valid `[B, K] bool`), K = max_per_img, sorted
      by score.
    """
    if score_style not in SCORE_STYLES:
        raise ValueError(f"fcos_postprocess: score_style {score_style!r} not in {SCORE_STYLES}")
    img_shape = jnp.asarray(img_shape)
    dt = dtypes.float_dtype(*cls_scores, *bbox_preds, *centernesses)
    scale_factor = jnp.asarray(scale_factor, dt)
    batch = cls_scores[0].shape[0]
    all_boxes, all_cls, all_ctr, all_sel = [], [], [], []
    for cls, reg, ctr, pts, s in zip(
        cls_scores, bbox_preds, centernesses, points, strides, strict=True
    ):
        scores = jax.nn.sigmoid(cls.reshape(batch, -1, num_classes).astype(dt))
        cent = jax.nn.sigmoid(ctr.reshape(batch, -1).astype(dt))
        dist = reg.reshape(batch, -1, 4).astype(dt)
        if norm_on_bbox:
            dist = dist * float(s)
        pts = jnp.broadcast_to(pts[None], (batch, *pts.shape))
        if score_style == "mmdet":
            if 0 < nms_pre < scores.shape[1]:
                key = (scores * cent[..., None]).max(-1)
                scores, cent, dist, pts = top_candidates(key, nms_pre, scores, cent, dist, pts)
            boxes = box_ops.distance2bbox(pts, dist, max_shape=img_shape)
            all_boxes.append(boxes)
            all_cls.append(scores)
            all_ctr.append(cent)
        else:
            pair = jnp.sqrt(scores * cent[..., None]).reshape(batch, -1)  # index n*C + c
            k = min(nms_pre, pair.shape[1]) if nms_pre > 0 else pair.shape[1]
            top, idx = jax.lax.top_k(jnp.where(pair > score_thr, pair, -jnp.inf), k)
            n = idx // num_classes
            boxes = box_ops.distance2bbox(
                jnp.take_along_axis(pts, n[..., None], axis=1),
                jnp.take_along_axis(dist, n[..., None], axis=1),
                max_shape=img_shape,
            )
            all_boxes.append(boxes)
            all_sel.append((top, (idx % num_classes).astype(jnp.int32)))
    boxes = jnp.concatenate(all_boxes, axis=1) / scale_factor[:, None, :]
    if score_style == "mmdet":
        scores = jnp.concatenate(all_cls, axis=1)  # [B, M, C]
        cent = jnp.concatenate(all_ctr, axis=1)  # [B, M]
        passed = scores > score_thr
        pair = jnp.where(passed, scores * cent[..., None], -jnp.inf).reshape(batch, -1)
        k = min(max_candidates, pair.shape[1])
        top, idx = jax.lax.top_k(pair, k)
        cand_boxes = jnp.take_along_axis(boxes, (idx // num_classes)[..., None], axis=1)
        cand_labels = (idx % num_classes).astype(jnp.int32)
    else:
        top = jnp.concatenate([t for t, _ in all_sel], axis=1)
        cand_labels = jnp.concatenate([lab for _, lab in all_sel], axis=1)
        cand_boxes = boxes
    return jax.vmap(lambda b, s, lab: _nms(b, s, lab, iou_threshold, max_per_img))(
        cand_boxes, top, cand_labels
    )


def _nms(
    boxes: Array, scores: Array, labels: Array, iou_threshold: float, max_per_img: int
) -> dict[str, Array]:
    """One image: candidate pairs `boxes [M, 4]`, `scores [M]` (-inf: not a candidate),
    `labels [M]` -> class-wise NMS, the `max_per_img` best as static arrays."""
    valid = jnp.isfinite(scores)
    scores = jnp.where(valid, scores, 0.0)
    keep, keep_valid = nms_ops.batched_nms(boxes, scores, labels, valid, iou_threshold, max_per_img)
    keep_valid = keep_valid & valid[keep]
    return dict(
        boxes=jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        scores=jnp.where(keep_valid, scores[keep], 0.0),
        labels=jnp.where(keep_valid, labels[keep], -1),
        valid=keep_valid,
    )


# -------------------------------------------------------------------------------- detector
def shift_input(images: Array, shift: Sequence[float], img_shape: Array | None = None) -> Array:
    """`images [B, H, W, 3]` + `shift [3]` (pixel units, per channel) on rows `< h` and
    columns `< w` of each image (`img_shape [B, 2]` = (h, w)); the rest of the canvas is left
    as it is. `img_shape=None`: every pixel. A zero shift returns `images` unchanged."""
    if not any(float(v) for v in shift):
        return images
    delta = jnp.asarray(shift, images.dtype)
    if img_shape is None:
        return images + delta
    img_shape = jnp.asarray(img_shape)
    _, h, w, _ = images.shape
    inside = (jnp.arange(h)[None, :, None] < img_shape[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < img_shape[:, 1, None, None]
    )
    return images + jnp.where(inside[..., None], delta, jnp.zeros((), images.dtype))


class FCOS(SingleStageDetector):
    """mmdetection 2.x `FCOS` implementing the detector API of docs/contracts.md.

    Build with `FCOS.from_config(fgd_jax.config.fcos_model(...))` or by hand. The model
    config's groups are its parts: `backbone`, `neck`, `head` (-> `bbox_head`, an `FCOSHead`,
    with `num_classes`), `train_cfg` (`FCOSTrainCfg`), `test_cfg` (`FCOSTestCfg`), and
    `pixel_mean` / `data_pixel_mean` (-> `input_shift`, see the module docstring).
    """

    backbone: nn.Module
    neck: nn.Module
    bbox_head: FCOSHead
    train_cfg: FCOSTrainCfg = FCOSTrainCfg()
    test_cfg: FCOSTestCfg = FCOSTestCfg()
    input_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    KIND = "fcos"
    HEAD = FCOSHead
    TRAIN_CFG = FCOSTrainCfg
    TEST_CFG = FCOSTestCfg
    EXTRA_KEYS = ("pixel_mean", "data_pixel_mean")

    @classmethod
    def build_parts(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> dict:
        """`SingleStageDetector.build_parts` and FCOS's own checks: regress_ranges per
        stride, the bbox loss, the score style, and `input_shift` from `pixel_mean` /
        `data_pixel_mean`."""
        parts = super().build_parts(model_cfg, dtype)
        head, test_cfg = parts["bbox_head"], parts["test_cfg"]
        if len(head.regress_ranges) != len(head.strides):
            raise ValueError(
                f"fcos model config: head.regress_ranges has {len(head.regress_ranges)} entries "
                f"but head.strides has {len(head.strides)}"
            )
        if head.loss_bbox not in LOSS_BBOX:
            raise ValueError(
                f"fcos model config: head.loss_bbox {head.loss_bbox!r} not in {LOSS_BBOX}"
            )
        if test_cfg.score_style not in SCORE_STYLES:
            raise ValueError(
                f"fcos model config: test_cfg.score_style {test_cfg.score_style!r} not in "
                f"{SCORE_STYLES}"
            )
        pixel_mean, data_mean = model_cfg.get("pixel_mean"), model_cfg.get("data_pixel_mean")
        if (pixel_mean is None) != (data_mean is None):
            raise ValueError(
                "fcos model config: set both pixel_mean and data_pixel_mean (or neither), got "
                f"{pixel_mean!r} and {data_mean!r}"
            )
        shift = (0.0, 0.0, 0.0)
        if pixel_mean is not None:
            if len(pixel_mean) != 3 or len(data_mean) != 3:
                raise ValueError(
                    "fcos model config: pixel_mean and data_pixel_mean need 3 values (BGR)"
                )
            shift = tuple(float(d) - float(p) for d, p in zip(data_mean, pixel_mean, strict=True))
        return dict(parts, input_shift=shift)

    @property
    def regress_ranges(self) -> Sequence[tuple[float, float]]:
        return self.bbox_head.regress_ranges

    def extract_feat(
        self, images: Array, train: bool = False, img_shape: Array | None = None
    ) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> FPN maps P3..P7, NHWC, finest first. `img_shape [B, 2]` (h, w)
        bounds the `input_shift` (None: the whole canvas)."""
        images = shift_input(images, self.input_shift, img_shape)
        return tuple(self.neck(self.backbone(images, train=train)))

    def __call__(
        self, images: Array, train: bool = False, img_shape: Array | None = None
    ) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features, cls_scores, bbox_preds, centernesses) per level
        (`[B, H_l, W_l, C]`, `[B, H_l, W_l, 4]`, `[B, H_l, W_l, 1]`, see `FCOSHead`).
        `img_shape`: see `extract_feat`."""
        feats = self.extract_feat(images, train=train, img_shape=img_shape)
        cls_scores, bbox_preds, centernesses = self.bbox_head(feats)
        return dict(
            features=feats,
            cls_scores=cls_scores,
            bbox_preds=bbox_preds,
            centernesses=centernesses,
        )

    def points(self, feat_shapes: Sequence[tuple[int, int]]) -> list[Array]:
        """Points per level for the given feature shapes (no parameters needed)."""
        return fcos_points(
            feat_shapes, strides=self.strides, half_stride_offset=self.bbox_head.half_stride_offset
        )

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch dict."""
        self.check_batch(batch)
        head = self.bbox_head
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        counts = [h * w for h, w in shapes]
        points = jnp.concatenate(self.points(shapes), axis=0)
        return fcos_loss(
            flatten_levels(outs["cls_scores"], head.num_classes),
            flatten_levels(outs["bbox_preds"], 4),
            flatten_levels(outs["centernesses"], 1)[..., 0],
            points,
            _per_point(head.strides, counts),
            _per_point(head.regress_ranges, counts),
            point_valid_flags(
                shapes, head.strides, batch["img_shape"], self.train_cfg.size_divisor
            ),
            jnp.asarray(batch["boxes"], dtypes.float_dtype(batch["boxes"])),
            jnp.asarray(batch["labels"]),
            jnp.asarray(batch["valid"], bool),
            num_classes=head.num_classes,
            center_sampling=head.center_sampling,
            center_sample_radius=head.center_sample_radius,
            norm_on_bbox=head.norm_on_bbox,
            loss_bbox_type=head.loss_bbox,
            focal_gamma=head.focal_gamma,
            focal_alpha=head.focal_alpha,
            loss_cls_weight=head.loss_cls_weight,
            loss_bbox_weight=head.loss_bbox_weight,
            loss_centerness_weight=head.loss_centerness_weight,
        )

    def input_kwargs(self, img_shape: Array | None) -> dict[str, Any]:
        """`__call__` gets the batch's `img_shape`: it bounds the `input_shift`."""
        return dict(img_shape=img_shape)

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`fcos_postprocess` with this model's settings on `__call__` outputs."""
        head, tc = self.bbox_head, self.test_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        return fcos_postprocess(
            outs["cls_scores"],
            outs["bbox_preds"],
            outs["centernesses"],
            self.points(shapes),
            head.strides,
            img_shape,
            scale_factor,
            num_classes=head.num_classes,
            norm_on_bbox=head.norm_on_bbox,
            nms_pre=tc.nms_pre,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
            max_candidates=tc.max_candidates,
            score_style=tc.score_style,
        )

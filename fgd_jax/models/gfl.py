"""GFL (Generalized Focal Loss) with mmdetection 2.x (2.11) semantics, NHWC, Flax Linen, static
shapes under jit.

Pieces (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (ResNet, pytorch style) -> `neck` (FPN, start_level 1, P6/P7 by 3x3 convs on the
  FPN outputs, `add_extra_convs='on_output'`, no ReLU) -> `bbox_head` (`GFLHead`: two stacks of
  3x3 conv + GN(32) + ReLU, `gfl_cls` (C channels, quality-joint scores) and `gfl_reg`
  (`4 * (reg_max + 1)` distribution logits), one learnable `scales_{l}/scale` per level).
- Anchors: mmdetection `AnchorGenerator` with one square anchor per cell (octave_base_scale 8,
  scales_per_octave 1, ratio 1), centred at `(x * stride, y * stride)`; the anchor centre is
  the point the distances are measured from.
- Training (`gfl_loss`): `ATSSAssigner` (top 9 per level, `fgd_jax.ops.assign.atss_assign`).
  On the positives, in units of the level's stride: the predicted distances are the integral of
  the softmax over the `reg_max + 1` bins; the decoded box's IoU with its GT (no gradient) is
  the soft target of the Quality Focal Loss (beta 2) over all valid anchors / the number of
  positives; GIoU (weight 2) and Distribution Focal Loss (weight 0.25, targets clamped to
  `[0, reg_max - 0.1]`, averaged over the 4 sides) are weighted by the positive's highest class
  score (no gradient) and divided by the sum of those weights (mmdetection 2.11
  `GFLHead.loss_single` + `loss`).
- Inference (`gfl_postprocess`): mmdetection 2.11 `GFLHead._get_bboxes`: per level the top
  `nms_pre` anchors by their best class score, distances `integral * stride` from the anchor
  centre, clipped to `img_shape`, divided by `scale_factor`; `multiclass_nms` (score >
  `score_thr`, class-wise NMS at 0.6, `max_per_img`).

Loss normalisation across devices: mmdetection 2.11 divides QFL by
`max(reduce_mean(sum_i max(num_pos_i, 1)), 1)` and GIoU / DFL by
`max(reduce_mean(sum of the weights), 1)` and DDP averages the gradients, which equals
normalising the global batch by its global sums (what `gfl_loss` does); only the floor of the
weight sum differs (`max(total, 1)` here, `max(total, num_gpus)` there; it only matters with
almost no positive).

mmdetection 3.3 differs from 2.11 (scripts/oracles/make_gfl_golden.py compares against 2.11's
rules built from 3.3's parts): its QFL normaliser is `sum_i num_pos_i` (no per-image floor at
1), and its inference keeps the top `nms_pre` (anchor, class) pairs above `score_thr` per
level (2.11: the top `nms_pre` anchors by best class score, then the threshold) and drops
boxes of zero width or height when `min_bbox_size >= 0` (2.11's GFL never does).

Anchors on the canvas padding: as RetinaNet (`anchor_valid_flags`): with `size_divisor > 0`
only the anchors inside each image's own padded shape `ceil(img_shape / size_divisor) *
size_divisor` take part (mmdetection's valid flags; `allowed_border=-1` keeps them all
otherwise); the others are left out of the assignment and of every loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgd_jax.models.dense_heads import (
    DenseTestCfg,
    anchor_valid_flags,
    batched_multiclass_nms,
    flatten_levels,
    top_candidates,
)
from fgd_jax.models.fcos import Scale
from fgd_jax.models.layers import ConvModule, head_out_conv, head_tower
from fgd_jax.models.retinanet import retina_anchors
from fgd_jax.models.single_stage import SingleStageDetector
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops

Array = jax.Array


# ------------------------------------------------------------------------------------ head
class GFLHead(nn.Module):
    """mmdetection 2.11 `GFLHead`.

    Attributes:
      num_classes: foreground classes (sigmoid, quality-joint scores; no background channel).
      in_channels: channels of the FPN maps (checked when set).
      feat_channels, stacked_convs: tower width / depth (3x3 conv -> GN -> ReLU, no conv bias,
        mmdetection's `bias='auto'` with a norm).
      num_groups: GroupNorm groups. prior_prob: initial foreground probability (`gfl_cls` bias).
      reg_max: the distribution's largest bin (`reg_max + 1` bins per side).
      octave_base_scale, scales_per_octave, ratios, strides: the anchors (one per cell).
      qfl_beta, loss_cls_weight, loss_bbox_weight (GIoU), loss_dfl_weight, giou_eps: the
        losses' settings (read by the detector).
    Init as mmdetection: tower convs and both output convs normal(std=0.01), bias 0; `gfl_cls`
    bias `-log((1 - prior_prob) / prior_prob)`; scales 1.
    Call: tuple of NHWC maps `[B, H_l, W_l, in_ch]` -> (cls_scores `[B, H_l, W_l, C]` logits,
      bbox_preds `[B, H_l, W_l, 4 * (reg_max + 1)]` distribution logits after the level's
      scale, side-major: channel `side * (reg_max + 1) + bin`, sides (left, top, right,
      bottom)), tuples over levels, float32 (float64 in a float64 run).
    """

    num_classes: int
    in_channels: int | None = None
    feat_channels: int = 256
    stacked_convs: int = 4
    num_groups: int = 32
    prior_prob: float = 0.01
    reg_max: int = 16
    # anchors (mmdetection `AnchorGenerator`)
    octave_base_scale: float = 8.0
    scales_per_octave: int = 1
    ratios: Sequence[float] = (1.0,)
    strides: Sequence[int] = (8, 16, 32, 64, 128)
    # losses (QFL + GIoU + DFL)
    qfl_beta: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 2.0
    loss_dfl_weight: float = 0.25
    giou_eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"GFLHead: {len(feats)} feature maps but {len(self.strides)} strides")
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"GFLHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config head.in_channels vs neck)"
            )
        if len(self.ratios) * self.scales_per_octave != 1:
            raise ValueError("GFLHead: one anchor per cell (ratios (1.0,), scales_per_octave 1)")
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
                use_bias=False,
            )

        cls_convs, reg_convs = tower("cls_convs"), tower("reg_convs")
        bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
        gfl_cls = head_out_conv(
            self.num_classes, bias_cls, "gfl_cls", dtype=self.dtype, kernel_init=init
        )
        gfl_reg = head_out_conv(
            4 * (self.reg_max + 1), 0.0, "gfl_reg", dtype=self.dtype, kernel_init=init
        )
        scales = [Scale(1.0, name=f"scales_{i}") for i in range(len(self.strides))]
        cls_scores, bbox_preds = [], []
        for lvl, x in enumerate(feats):
            c = r = x
            for conv in cls_convs:
                c = conv(c)
            for conv in reg_convs:
                r = conv(r)
            cls = gfl_cls(c)
            reg = scales[lvl](gfl_reg(r))
            cls_scores.append(cls.astype(dtypes.float_dtype(cls)))
            bbox_preds.append(reg.astype(dtypes.float_dtype(reg)))
        return tuple(cls_scores), tuple(bbox_preds)


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class GFLTrainCfg:
    """Training settings (model config `train_cfg`): `ATSSAssigner` `topk` and
    `ignore_iof_thr` (-1: crowd boxes play no part, mmdetection's GFL configs), `size_divisor`
    of the anchor valid flags (module docstring)."""

    topk: int = 9
    ignore_iof_thr: float = -1.0
    size_divisor: int = 32


@dataclasses.dataclass(frozen=True)
class GFLTestCfg(DenseTestCfg):
    """`DenseTestCfg` with GFL's NMS threshold 0.6 (mmdetection `gfl_r50_fpn_1x_coco`)."""

    iou_threshold: float = 0.6


_HEAD = GFLHead(num_classes=1)  # the field defaults, read by the functions below
_TRAIN = GFLTrainCfg()
_TEST = GFLTestCfg()


# --------------------------------------------------------------------------------- anchors
def gfl_anchors(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = _HEAD.strides,
    octave_base_scale: float = _HEAD.octave_base_scale,
    scales_per_octave: int = _HEAD.scales_per_octave,
    ratios: Sequence[float] = _HEAD.ratios,
) -> list[Array]:
    """mmdetection GFL anchors per level: list of `[H_l*W_l, 4] float32` xyxy pixels, index
    `y*W + x`, centred at `(x * stride, y * stride)`."""
    return retina_anchors(feat_shapes, strides, octave_base_scale, scales_per_octave, ratios)


def anchor_centers(anchors: Array) -> Array:
    """mmdetection `GFLHead.anchor_center`: `[..., 4]` xyxy -> `[..., 2]` (x, y)."""
    return jnp.stack(
        [(anchors[..., 2] + anchors[..., 0]) / 2, (anchors[..., 3] + anchors[..., 1]) / 2], -1
    )


# ------------------------------------------------------------------------------------ loss
def gfl_targets(
    anchors: Array,
    num_level_anchors: Sequence[int],
    anchor_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    topk: int = _TRAIN.topk,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    ignore_iof_thr: float = _TRAIN.ignore_iof_thr,
) -> dict[str, Array]:
    """Targets of ONE image (vmap for a batch), mmdetection 2.11 `GFLHead._get_target_single`.

    Args: anchors `[N, 4]`; num_level_anchors: static per-level counts; anchor_valid `[N]` bool
      (mmdetection's `inside_flags` with `allowed_border=-1`); gt_boxes `[G, 4]`,
      gt_labels `[G] int32`, gt_valid `[G] bool`; ignore boxes as `atss_assign`.
    Returns: dict of `assigned [N] int32` (`atss_assign`), `labels [N] int32` (class, or
      `num_classes` off the positives), `label_weights [N]` (1 on positives and negatives, 0 on
      ignored and invalid anchors), `pos [N] bool`, `bbox_targets [N, 4]` (the GT box in
      pixels on positives, 0 elsewhere).
    """
    assigned = assign_ops.atss_assign(
        anchors,
        tuple(num_level_anchors),
        gt_boxes,
        gt_valid,
        topk=topk,
        anchor_valid=anchor_valid,
        ignore_boxes=ignore_boxes,
        ignore_valid=ignore_valid,
        ignore_iof_thr=ignore_iof_thr,
    )
    pos = assigned >= 0
    neg = assigned == assign_ops.NEGATIVE
    idx = jnp.clip(assigned, 0, gt_boxes.shape[0] - 1)
    labels = jnp.where(pos, gt_labels[idx], num_classes).astype(jnp.int32)
    targets = jnp.where(pos[:, None], gt_boxes[idx], 0.0)
    return dict(
        assigned=assigned,
        labels=labels,
        label_weights=(pos | neg).astype(dtypes.float_dtype(gt_boxes)),
        pos=pos,
        bbox_targets=targets,
    )


def gfl_loss(
    cls_scores: Array,
    bbox_preds: Array,
    anchors: Array,
    anchor_strides: Array,
    num_level_anchors: Sequence[int],
    anchor_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    topk: int = _TRAIN.topk,
    ignore_iof_thr: float = _TRAIN.ignore_iof_thr,
    reg_max: int = _HEAD.reg_max,
    qfl_beta: float = _HEAD.qfl_beta,
    loss_cls_weight: float = _HEAD.loss_cls_weight,
    loss_bbox_weight: float = _HEAD.loss_bbox_weight,
    loss_dfl_weight: float = _HEAD.loss_dfl_weight,
    giou_eps: float = _HEAD.giou_eps,
    iou_eps: float = 1e-6,
) -> dict[str, Array]:
    """mmdetection 2.11 `GFLHead.loss` over a global batch (module docstring).

    Args:
      cls_scores: `[B, N, C]` logits; bbox_preds: `[B, N, 4 * (reg_max + 1)]` distribution
        logits (levels flattened, `flatten_levels`).
      anchors: `[N, 4]`; anchor_strides: `[N]` each anchor's level stride;
      num_level_anchors: static per-level counts; anchor_valid: `[B, N] bool`.
      gt_boxes `[B, G, 4]`, gt_labels `[B, G] int32`, gt_valid `[B, G] bool`; ignore_boxes
        `[B, I, 4]` and ignore_valid `[B, I]` (only used with `ignore_iof_thr > 0`).
    Returns: {'loss_cls', 'loss_bbox', 'loss_dfl'} float32 scalars (float64 in a float64 run).
    """
    dt = dtypes.float_dtype(cls_scores, bbox_preds, gt_boxes)
    use_ignore = ignore_boxes is not None and ignore_iof_thr > 0
    extra = (ignore_boxes, ignore_valid) if use_ignore else (None, None)

    def one(valid, boxes, labels, gvalid, ign, ign_valid):
        return gfl_targets(
            anchors,
            num_level_anchors,
            valid,
            boxes,
            labels,
            gvalid,
            num_classes=num_classes,
            topk=topk,
            ignore_boxes=ign,
            ignore_valid=ign_valid,
            ignore_iof_thr=ignore_iof_thr if use_ignore else -1.0,
        )

    in_axes = (0, 0, 0, 0, 0 if use_ignore else None, 0 if use_ignore else None)
    t = jax.vmap(one, in_axes=in_axes)(
        jnp.asarray(anchor_valid, bool),
        jnp.asarray(gt_boxes, dt),
        jnp.asarray(gt_labels, jnp.int32),
        jnp.asarray(gt_valid, bool),
        *extra,
    )
    pos = t["pos"]  # [B, N]
    posf = pos.astype(dt)
    cls = cls_scores.astype(dt)
    stride = jnp.asarray(anchor_strides, dt)[None, :, None]  # [1, N, 1]
    centers = anchor_centers(jnp.asarray(anchors, dt))[None] / stride  # [1, N, 2]
    centers = jnp.broadcast_to(centers, pos.shape + (2,))
    # Off the positives use a unit box around the centre so nothing can become nan; weight 0.
    unit = jnp.concatenate([centers - 0.5, centers + 0.5], axis=-1)
    target_boxes = jnp.where(pos[..., None], t["bbox_targets"] / stride, unit)
    dist = box_ops.distribution_integral(bbox_preds.astype(dt), reg_max)  # [B, N, 4]
    pred_boxes = box_ops.distance2bbox(centers, dist)
    pred_boxes = jnp.where(pos[..., None], pred_boxes, unit)

    weight = jax.lax.stop_gradient(jnp.max(jax.nn.sigmoid(cls), axis=-1)) * posf  # [B, N]
    quality = box_ops.box_iou_aligned(
        jax.lax.stop_gradient(pred_boxes), target_boxes, mode="iou", eps=iou_eps
    )
    quality = jnp.where(pos, quality, 0.0)
    qfl = loss_ops.quality_focal_loss(cls, t["labels"], quality, beta=qfl_beta)
    num_total = jnp.maximum(jnp.sum(jnp.maximum(jnp.sum(posf, axis=1), 1.0)), 1.0)
    loss_cls = jnp.sum(qfl * t["label_weights"]) / num_total

    giou = loss_ops.giou_loss(pred_boxes, target_boxes, eps=giou_eps)
    target_d = box_ops.bbox2distance(centers, target_boxes, max_dis=float(reg_max))
    logits = bbox_preds.astype(dt).reshape(*pos.shape, 4, reg_max + 1)
    dfl = loss_ops.distribution_focal_loss(logits, target_d)  # [B, N, 4]
    avg = jnp.maximum(jnp.sum(weight), 1.0)
    loss_bbox = jnp.sum(giou * weight) / avg
    loss_dfl = jnp.sum(dfl * weight[..., None]) / 4.0 / avg
    return dict(
        loss_cls=loss_cls_weight * loss_cls,
        loss_bbox=loss_bbox_weight * loss_bbox,
        loss_dfl=loss_dfl_weight * loss_dfl,
    )


# ------------------------------------------------------------------------------- inference
def gfl_postprocess(
    cls_scores: Sequence[Array],
    bbox_preds: Sequence[Array],
    anchors: Sequence[Array],
    strides: Sequence[int],
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    reg_max: int = _HEAD.reg_max,
    nms_pre: int = _TEST.nms_pre,
    score_thr: float = _TEST.score_thr,
    iou_threshold: float = _TEST.iou_threshold,
    max_per_img: int = _TEST.max_per_img,
    max_candidates: int = _TEST.max_candidates,
) -> dict[str, Array]:
    """mmdetection 2.11 `GFLHead._get_bboxes` (rescale=True) + `multiclass_nms`, static.

    Args:
      cls_scores / bbox_preds: per level `[B, H, W, C]` logits / `[B, H, W, 4 * (reg_max + 1)]`.
      anchors: per level `[H*W, 4]`; strides: per level. img_shape: `[B, 2]` (h, w) of the
        resized image. scale_factor: `[B, 4]` (w, h, w, h).
    Returns: dict(boxes `[B, K, 4]` xyxy in original-image pixels, scores `[B, K]`,
      labels `[B, K] int32`, valid `[B, K] bool`), K = max_per_img, sorted by score.
    """
    img_shape = jnp.asarray(img_shape)
    dt = dtypes.float_dtype(*cls_scores, *bbox_preds)
    scale_factor = jnp.asarray(scale_factor, dt)
    batch = cls_scores[0].shape[0]
    all_boxes, all_scores = [], []
    for cls, reg, anc, stride in zip(cls_scores, bbox_preds, anchors, strides, strict=True):
        scores = jax.nn.sigmoid(cls.reshape(batch, -1, num_classes).astype(dt))
        dist = box_ops.distribution_integral(reg.astype(dt), reg_max) * stride
        dist = dist.reshape(batch, -1, 4)
        pts = jnp.broadcast_to(anchor_centers(anc.astype(dt))[None], (batch, anc.shape[0], 2))
        if 0 < nms_pre < scores.shape[1]:
            scores, dist, pts = top_candidates(scores.max(-1), nms_pre, scores, dist, pts)
        all_boxes.append(box_ops.distance2bbox(pts, dist, max_shape=img_shape))
        all_scores.append(scores)
    boxes = jnp.concatenate(all_boxes, axis=1) / scale_factor[:, None, :]  # [B, M, 4]
    scores = jnp.concatenate(all_scores, axis=1)  # [B, M, C]
    return batched_multiclass_nms(
        boxes,
        scores,
        score_thr=score_thr,
        iou_threshold=iou_threshold,
        max_num=max_per_img,
        max_candidates=max_candidates,
    )


# -------------------------------------------------------------------------------- detector
class GFL(SingleStageDetector):
    """mmdetection 2.x `GFL` implementing the detector API of docs/contracts.md.

    Build with `GFL.from_config(fgd_jax.config.gfl_model(...))` or by hand. The model config's
    groups are its parts: `backbone`, `neck`, `head` (-> `bbox_head`, a `GFLHead`, with
    `num_classes`), `train_cfg` (`GFLTrainCfg`), `test_cfg` (`GFLTestCfg`); their defaults are
    those classes' field defaults.
    """

    backbone: nn.Module
    neck: nn.Module
    bbox_head: GFLHead
    train_cfg: GFLTrainCfg = GFLTrainCfg()
    test_cfg: GFLTestCfg = GFLTestCfg()

    KIND = "gfl"
    HEAD = GFLHead
    TRAIN_CFG = GFLTrainCfg
    TEST_CFG = GFLTestCfg

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features, cls_scores, bbox_preds), see `GFLHead`."""
        feats = self.extract_feat(images, train=train)
        cls_scores, bbox_preds = self.bbox_head(feats)
        return dict(features=feats, cls_scores=cls_scores, bbox_preds=bbox_preds)

    def anchors(self, feat_shapes: Sequence[tuple[int, int]]) -> list[Array]:
        """Anchors per level for the given feature shapes (no parameters needed)."""
        head = self.bbox_head
        return gfl_anchors(
            feat_shapes, head.strides, head.octave_base_scale, head.scales_per_octave, head.ratios
        )

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch dict."""
        self.check_batch(batch)
        head, tc = self.bbox_head, self.train_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        counts = [h * w for h, w in shapes]
        anchors = jnp.concatenate(self.anchors(shapes), axis=0)
        strides = jnp.concatenate(
            [jnp.full((n,), s, jnp.float32) for n, s in zip(counts, head.strides, strict=True)]
        )
        valid = anchor_valid_flags(shapes, head.strides, 1, batch["img_shape"], tc.size_divisor)
        return gfl_loss(
            flatten_levels(outs["cls_scores"], head.num_classes),
            flatten_levels(outs["bbox_preds"], 4 * (head.reg_max + 1)),
            anchors,
            strides,
            counts,
            valid,
            jnp.asarray(batch["boxes"], dtypes.float_dtype(batch["boxes"])),
            batch["labels"],
            batch["valid"],
            num_classes=head.num_classes,
            ignore_boxes=batch.get("ignore_boxes"),
            ignore_valid=batch.get("ignore_valid"),
            topk=tc.topk,
            ignore_iof_thr=tc.ignore_iof_thr,
            reg_max=head.reg_max,
            qfl_beta=head.qfl_beta,
            loss_cls_weight=head.loss_cls_weight,
            loss_bbox_weight=head.loss_bbox_weight,
            loss_dfl_weight=head.loss_dfl_weight,
            giou_eps=head.giou_eps,
        )

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`gfl_postprocess` with this model's settings on `__call__` outputs."""
        head, tc = self.bbox_head, self.test_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        return gfl_postprocess(
            outs["cls_scores"],
            outs["bbox_preds"],
            self.anchors(shapes),
            head.strides,
            img_shape,
            scale_factor,
            num_classes=head.num_classes,
            reg_max=head.reg_max,
            nms_pre=tc.nms_pre,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
            max_candidates=tc.max_candidates,
        )

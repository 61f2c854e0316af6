"""The RoI head of two-stage detectors (mmdetection 2.x / 2.11 `StandardRoIHead` with a
`Shared2FCBBoxHead`), Flax Linen, static shapes: RoI features, sampled targets and loss, and
the detections.

- `StandardRoIHead` holds `bbox_head` (parameters under `roi_head/bbox_head/...`) and the RoI
  extractor's settings: RoIAlign 7x7 (aligned, sampling_ratio 0) on P2..P5 with the level
  `floor(log2(sqrt(w*h)/56 + 1e-6))` clamped to [0, 3] (`extract_roi_feats`).
- `Shared2FCBBoxHead`: the features flattened in PyTorch's (C, 7, 7) order, `shared_fcs_0/1`
  (+ReLU), `fc_cls` (num_classes + 1, background LAST) and `fc_reg` (4 per class, target stds
  0.1/0.1/0.2/0.2).
- Targets (`rcnn_targets`): the GT added to the proposals, MaxIoUAssigner(0.5, 0.5, 0.5, no
  low-quality matches), 512 sampled (positive fraction 0.25); loss (`rcnn_loss`): softmax CE
  over sampled RoIs / #sampled, L1 of the GT class's deltas over the positives / #sampled.
- Detections (`rcnn_postprocess`): softmax, class-specific deltas decoded + clipped, divided
  by `scale_factor`, `multiclass_nms` (score > 0.05, class-wise NMS 0.5, 100 per image).

Used by `fgd_jax.models.faster_rcnn` (and next by Mask R-CNN / Cascade R-CNN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgd_jax.models.dense_heads import group_mean, without_index
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import nms as nms_ops
from fgd_jax.ops import roi_align as roi_ops
from fgd_jax.ops import sampling as sampling_ops
from fgd_jax.ops.sampling import sample_assigned

Array = jax.Array

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
ZERO_MEANS = (0.0, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------- heads
class Shared2FCBBoxHead(nn.Module):
    """mmdetection `Shared2FCBBoxHead` (`ConvFCBBoxHead` with two shared fcs).

    Init as mmdetection: shared fcs xavier-uniform, `fc_cls` normal(0.01), `fc_reg`
    normal(0.001), biases 0.
    Call: RoI features `[..., S, S, C]` (NHWC bins) -> (cls_score `[..., num_classes + 1]`,
      background last; bbox_pred `[..., 4 * num_classes]`), float32. The features are
      flattened in PyTorch's `(C, S, S)` order, so `shared_fcs_0` converts without permutation.
    """

    num_classes: int
    fc_out_channels: int = 1024
    num_shared_fcs: int = 2
    target_stds: Sequence[float] = RCNN_STDS  # box coder (`DeltaXYWHBBoxCoder`), means 0
    dtype: Any = None

    @nn.compact
    def __call__(self, roi_feats: Array) -> tuple[Array, Array]:
        lead = roi_feats.shape[:-3]
        x = jnp.moveaxis(roi_feats, -1, -3).reshape(*lead, -1)  # (C, S, S) flattened
        for i in range(self.num_shared_fcs):
            x = nn.Dense(
                self.fc_out_channels,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.xavier_uniform(),
                name=f"shared_fcs_{i}",
            )(x)
            x = nn.relu(x)
        cls = nn.Dense(
            self.num_classes + 1,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01),
            name="fc_cls",
        )(x)
        reg = nn.Dense(
            4 * self.num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.001),
            name="fc_reg",
        )(x)
        return cls.astype(dtypes.float_dtype(cls)), reg.astype(dtypes.float_dtype(reg))


class StandardRoIHead(nn.Module):
    """Holds `bbox_head` so its parameters live under `roi_head/bbox_head/...` (mmdetection
    `StandardRoIHead`), and the settings of the parameter-free RoI extraction
    (`extract_roi_feats`): `featmap_strides` (the levels used, finest first), `output_size`,
    `sampling_ratio`, `aligned`, `finest_scale`."""

    bbox_head: Shared2FCBBoxHead
    featmap_strides: Sequence[int] = (4, 8, 16, 32)
    output_size: int = 7
    sampling_ratio: int = 0
    aligned: bool = True
    finest_scale: float = 56.0

    def __call__(self, roi_feats: Array) -> tuple[Array, Array]:
        return self.bbox_head(roi_feats)

    def roi_feats(self, feats: Sequence[Array], rois: Array) -> Array:
        """RoIAlign features `[B, R, S, S, C]` of `rois [B, R, 4]` from the FPN maps."""
        return extract_roi_feats(
            feats[: len(self.featmap_strides)],
            rois,
            strides=self.featmap_strides,
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            finest_scale=self.finest_scale,
        )


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class RCNNTrainCfg:
    """RoI targets (model config `train_cfg.rcnn`): MaxIoUAssigner thresholds (no low-quality
    matches), the random sampler (`num` RoIs per image, `pos_fraction` positives) and whether
    the GT boxes join the proposals."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.5
    num: int = 512
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True


@dataclasses.dataclass(frozen=True)
class RCNNTestCfg:
    """Detections (model config `test_cfg.rcnn`): candidates with score > `score_thr`,
    class-wise NMS at `iou_threshold`, `max_per_img` kept; `max_candidates` as in
    `DenseTestCfg`."""

    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    max_candidates: int = 4000


_ROI = StandardRoIHead(Shared2FCBBoxHead(num_classes=1))  # field defaults, read below
_TRAIN = RCNNTrainCfg()
_TEST = RCNNTestCfg()


# ---------------------------------------------------------------------------- RoI features
def extract_roi_feats(
    feats: Sequence[Array],
    rois: Array,
    strides: Sequence[int] = _ROI.featmap_strides,
    output_size: int = _ROI.output_size,
    sampling_ratio: int = _ROI.sampling_ratio,
    aligned: bool = _ROI.aligned,
    finest_scale: float = _ROI.finest_scale,
) -> Array:
    """mmdetection `SingleRoIExtractor` (RoIAlign, level `map_roi_levels`), static shapes.

    Args: feats: the first `len(strides)` FPN maps `[B, H_l, W_l, C]`; rois `[B, R, 4]` xyxy
      pixels of the network input (padded RoIs are zeros; their features are discarded by the
      callers). Returns `[B, R, S, S, C]` float32 (float64 in a float64 run).
    """
    if len(feats) != len(strides):
        raise ValueError(f"extract_roi_feats: {len(feats)} feature maps, {len(strides)} strides")
    out = roi_ops.multi_level_roi_align(
        [f.astype(dtypes.float_dtype(f)) for f in feats],
        jnp.asarray(rois, dtypes.float_dtype(*feats, rois)),
        strides=tuple(strides),
        output_size=(output_size, output_size),
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        finest_scale=finest_scale,
    )
    return out


# ------------------------------------------------------------------------------ RoI loss
def rcnn_targets(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    key: Array,
    num_classes: int,
    pos_iou_thr: float = _TRAIN.pos_iou_thr,
    neg_iou_thr: float = _TRAIN.neg_iou_thr,
    min_pos_iou: float = _TRAIN.min_pos_iou,
    match_low_quality: bool = False,
    num: int = _TRAIN.num,
    pos_fraction: float = _TRAIN.pos_fraction,
    add_gt_as_proposals: bool = _TRAIN.add_gt_as_proposals,
    target_means: Sequence[float] = ZERO_MEANS,
    target_stds: Sequence[float] = _ROI.bbox_head.target_stds,
) -> dict[str, Array]:
    """Sampled RoI-head targets of ONE image (mmdetection `StandardRoIHead` assign + sample,
    `BBoxHead.get_targets`).

    The proposals are assigned first; with `add_gt_as_proposals` the valid GT boxes are then
    put in front of them, each assigned to itself (mmdetection `AssignResult.add_gt_`).
    Args: proposals `[P, 4]`, proposal_valid `[P]`, gt_boxes `[G, 4]`, gt_labels `[G]`,
      gt_valid `[G]`, key: PRNG key.
    Returns dict: `assigned` (`[G + P]` with GT added, else `[P]`), `rois [num, 4]`,
      `valid [num]`, `pos [num]` (positives come first), `labels [num] int32` (class, or
      `num_classes` for background and padding), `bbox_targets [num, 4]`, `gt_inds [num]
      int32` (the GT of each positive; meaningless elsewhere; Mask R-CNN's mask targets).
    """
    dt = dtypes.float_dtype(proposals, gt_boxes)
    proposals = jnp.asarray(proposals, dt)
    gt_boxes = jnp.asarray(gt_boxes, dt)
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    gt_valid = jnp.asarray(gt_valid, bool)
    assigned, overlaps = assign_ops.max_iou_assign(
        proposals,
        gt_boxes,
        gt_valid,
        pos_iou_thr=pos_iou_thr,
        neg_iou_thr=neg_iou_thr,
        min_pos_iou=min_pos_iou,
        match_low_quality=match_low_quality,
        anchor_valid=proposal_valid,
    )
    pool = proposals
    if add_gt_as_proposals:
        pool, _, assigned, _, _ = sampling_ops.add_gt_as_proposals(
            proposals, proposal_valid, assigned, overlaps, gt_boxes, gt_valid
        )
    inds, valid, pos = sample_assigned(assigned, num=num, pos_fraction=pos_fraction, key=key)
    rois = jnp.where(valid[:, None], pool[inds], 0.0)
    gt_idx = jnp.clip(assigned[inds], 0, gt_boxes.shape[0] - 1)
    labels = jnp.where(pos, gt_labels[gt_idx], num_classes).astype(jnp.int32)
    targets = box_ops.delta_encode(rois, gt_boxes[gt_idx], target_means, target_stds)
    targets = jnp.where(pos[:, None], targets, 0.0)
    return dict(
        assigned=assigned,
        rois=rois,
        valid=valid,
        pos=pos,
        labels=labels,
        bbox_targets=targets,
        gt_inds=gt_idx.astype(jnp.int32),
    )


def rcnn_loss(
    cls_score: Array,
    bbox_pred: Array,
    targets: dict[str, Array],
    num_classes: int,
    loss_norm_group: int = 0,
    loss_cls_weight: float = 1.0,
    loss_bbox_weight: float = 1.0,
) -> dict[str, Array]:
    """mmdetection 2.11 `BBoxHead.loss` (class-specific regression).

    Args: cls_score `[B, R, C+1]`; bbox_pred `[B, R, 4C]`; targets: `rcnn_targets` batched.
    Returns {'loss_cls': CE over sampled RoIs / #sampled, 'loss_bbox': L1 of the GT class's
      deltas over positives / #sampled}.
    """
    dt = dtypes.float_dtype(cls_score, bbox_pred)
    valid = jnp.asarray(targets["valid"]).astype(dt)
    pos = jnp.asarray(targets["pos"]).astype(dt)
    bbox_pred = jnp.asarray(bbox_pred, dt)
    ce = loss_ops.softmax_cross_entropy(cls_score, targets["labels"])  # [B, R]
    cls_per_img = jnp.sum(ce * valid, axis=1)
    b, r = bbox_pred.shape[:2]
    per_cls = bbox_pred.reshape(b, r, num_classes, 4)
    lab = jnp.clip(targets["labels"], 0, num_classes - 1)
    pred = jnp.take_along_axis(per_cls, lab[..., None, None], axis=2)[:, :, 0]  # [B, R, 4]
    l1 = loss_ops.l1_loss(pred, targets["bbox_targets"])
    bbox_per_img = jnp.sum(l1 * pos[..., None], axis=(1, 2))
    den = jnp.sum(valid, axis=1)
    return dict(
        loss_cls=loss_cls_weight
        * group_mean(cls_per_img, den, loss_norm_group, who="faster_rcnn loss"),
        loss_bbox=loss_bbox_weight
        * group_mean(bbox_per_img, den, loss_norm_group, who="faster_rcnn loss"),
    )


# ------------------------------------------------------------------------------ inference
def rcnn_postprocess(
    cls_score: Array,
    bbox_pred: Array,
    rois: Array,
    roi_valid: Array,
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    target_means: Sequence[float] = ZERO_MEANS,
    target_stds: Sequence[float] = _ROI.bbox_head.target_stds,
    score_thr: float = _TEST.score_thr,
    iou_threshold: float = _TEST.iou_threshold,
    max_per_img: int = _TEST.max_per_img,
    max_candidates: int = _TEST.max_candidates,
    rescale: bool = True,
) -> dict[str, Array]:
    """mmdetection 2.11 `BBoxHead.get_bboxes` (rescale=True) + `multiclass_nms`, static.

    Args: cls_score `[B, R, C+1]`; bbox_pred `[B, R, 4C]`; rois `[B, R, 4]`; roi_valid
      `[B, R]`; img_shape `[B, 2]`; scale_factor `[B, 4]`.
      max_candidates: (box, class) pairs above `score_thr` passed to NMS (highest first); equal
      to mmdetection whenever the last kept detection is among them.
    Returns dict(boxes `[B, K, 4]` original-image pixels, scores, labels int32, valid), K =
      max_per_img, sorted by score.
    """
    dt = dtypes.float_dtype(cls_score, bbox_pred)
    scores = jax.nn.softmax(cls_score.astype(dt), axis=-1)[..., :num_classes]
    scores = jnp.where(roi_valid[..., None], scores, 0.0)
    boxes = jax.vmap(
        lambda r, d, s: box_ops.delta_decode(r, d, target_means, target_stds, max_shape=s)
    )(rois, bbox_pred.astype(dt), jnp.asarray(img_shape))
    b, r = boxes.shape[:2]
    boxes = boxes.reshape(b, r, num_classes, 4)
    if rescale:
        sf = jnp.asarray(scale_factor, dt)
        boxes = boxes / sf[:, None, None, :]

    def one(bx, sc):  # class-specific boxes [R, C, 4], scores [R, C]
        dets = nms_ops.multiclass_nms(
            bx,
            sc,
            None,
            score_thr=score_thr,
            iou_threshold=iou_threshold,
            max_num=max_per_img,
            max_candidates=max_candidates,
        )
        return without_index(dets)

    return jax.vmap(one)(boxes, scores)

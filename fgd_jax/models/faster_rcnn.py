"""Faster R-CNN (mmdetection 2.x / 2.11 `faster_rcnn_r50_fpn`), NHWC, Flax Linen, static shapes.

Pieces (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (ResNet, C2..C5) -> `neck` (FPN, start_level 0, P2..P6, P6 = max-pool k1 s2 of P5).
- `rpn_head` (`RPNHead`): 3x3 conv + ReLU (`rpn_conv`), `rpn_cls` (one sigmoid logit per
  anchor), `rpn_reg` (4 deltas per anchor). Anchors: scale 8, ratios 0.5/1/2, strides 4..64
  (mmdetection `AnchorGenerator`, index `(y*W + x)*A + a`).
- Proposals (`rpn_proposals`, mmdetection 2.11 `RPNHead._get_bboxes`): per level the top
  `nms_pre` anchors by score, decode + clip to `img_shape`, boxes with `w or h < min_bbox_size`
  dropped only when `min_bbox_size > 0` (2.11 uses `>=` to keep), one NMS over all levels with
  the level index as the "class" (mmcv `batched_nms`), keep `max_per_img`. Static shapes:
  `[B, max_per_img, 4]` with a `valid` mask, sorted by score, under `stop_gradient`.
- `roi_head/bbox_head` (`Shared2FCBBoxHead`): RoIAlign 7x7 (aligned, sampling_ratio 0) on
  P2..P5 with the level `floor(log2(sqrt(w*h)/56 + 1e-6))` clamped to [0, 3], the features
  flattened in PyTorch's (C, 7, 7) order, `shared_fcs_0/1` (+ReLU), `fc_cls` (num_classes + 1,
  background LAST) and `fc_reg` (4 per class, target stds 0.1/0.1/0.2/0.2).
- Training (`forward_train`): RPN targets with MaxIoUAssigner(0.7, 0.3, min_pos_iou 0.3,
  low-quality matches) on the anchors inside mmdetection's per-image padded extent, random
  sampling of 256 (positive fraction 0.5), BCE + L1 both divided by the number of sampled
  anchors (`sum_i max(pos_i, 1) + max(neg_i, 1)`); RoI targets with the GT added to the
  proposals, MaxIoUAssigner(0.5, 0.5, 0.5, no low-quality matches), 512 sampled (positive
  fraction 0.25), softmax CE over sampled RoIs / #sampled, L1 of the GT class's deltas over the
  positives / #sampled. Sampling draws from the `'sampler'` rng stream.
- Inference (`predict`): softmax, class-specific deltas decoded + clipped, divided by
  `scale_factor`, `multiclass_nms` (score > 0.05, class-wise NMS 0.5, 100 per image).

Loss normalisation over devices follows `fgd_jax.models.retinanet` (`loss_norm_group`: 0 = one
normaliser for the global batch; g = groups of g images, each normalised by its own counts as
one mmdetection GPU with `samples_per_gpu=g`, then averaged).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.models.retinanet import anchor_valid_flags
from fgd_jax.ops import anchors as anchor_ops
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import nms as nms_ops
from fgd_jax.ops import roi_align as roi_ops
from fgd_jax.ops import sampling as sampling_ops

Array = jax.Array

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
ZERO_MEANS = (0.0, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------- heads
class RPNHead(nn.Module):
    """mmdetection `RPNHead` (sigmoid objectness). Init: normal(std=0.01), bias 0.

    Call: tuple of NHWC maps `[B, H_l, W_l, C]` -> (cls_scores, bbox_preds): tuples of
      `[B, H_l, W_l, A]` logits and `[B, H_l, W_l, A*4]` deltas, float32.
    """

    num_anchors: int = 3
    feat_channels: int = 256
    dtype: Any = None

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        init = nn.initializers.normal(0.01)

        def conv(features: int, k: int, name: str) -> nn.Conv:
            p = (k - 1) // 2
            return nn.Conv(
                features,
                (k, k),
                padding=((p, p), (p, p)),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=init,
                bias_init=nn.initializers.zeros,
                name=name,
            )

        rpn_conv = conv(self.feat_channels, 3, "rpn_conv")
        rpn_cls = conv(self.num_anchors, 1, "rpn_cls")
        rpn_reg = conv(self.num_anchors * 4, 1, "rpn_reg")
        cls_scores, bbox_preds = [], []
        for x in feats:
            h = nn.relu(rpn_conv(x))
            cls_scores.append(rpn_cls(h).astype(jnp.float32))
            bbox_preds.append(rpn_reg(h).astype(jnp.float32))
        return tuple(cls_scores), tuple(bbox_preds)


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
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


class StandardRoIHead(nn.Module):
    """Holds `bbox_head` so its parameters live under `roi_head/bbox_head/...` (mmdetection
    `StandardRoIHead`); RoI extraction is parameter-free (`extract_roi_feats`)."""

    bbox_head: Shared2FCBBoxHead

    def __call__(self, roi_feats: Array) -> tuple[Array, Array]:
        return self.bbox_head(roi_feats)


# --------------------------------------------------------------------------------- anchors
def rpn_anchors(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = (4, 8, 16, 32, 64),
    scales: Sequence[float] = (8.0,),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> list[Array]:
    """mmdetection RPN anchors per level: list of `[H_l*W_l*A, 4] float32` xyxy pixels."""
    return anchor_ops.multi_level_anchors(
        [tuple(s) for s in feat_shapes], strides=strides, scales=scales, ratios=ratios
    )


# ------------------------------------------------------------------------------- sampling
def sample_assigned(
    assigned: Array, num: int, pos_fraction: float, key: Array
) -> tuple[Array, Array, Array]:
    """mmdetection `RandomSampler` (neg_pos_ub=-1) on one image's assignment.

    Args: assigned `[N] int32` (`fgd_jax.ops.assign` encoding: k >= 0 positive, -1 negative,
      -2 ignored/padding); num, pos_fraction: sampler settings; key: PRNG key.
    Returns: (inds `[num] int32` into N, positives first; valid `[num] bool`; pos `[num] bool`).
      Exactly `min(#pos, int(num*pos_fraction))` positives and `min(#neg, num - n_pos)`
      negatives are valid; ignored entries are never sampled.
    """
    inds, pos, valid = sampling_ops.random_sample(assigned, None, num, pos_fraction, key)
    return inds.astype(jnp.int32), valid, pos & valid


def _group_mean(num_per_img: Array, den_per_img: Array, group: int) -> Array:
    """Sum numerators / denominators over groups of `group` images, mean over groups."""
    batch = num_per_img.shape[0]
    g = batch if group <= 0 else group
    if batch % g:
        raise ValueError(
            f"faster_rcnn loss: batch size {batch} is not a multiple of loss_norm_group {g} "
            "(model config train_cfg.loss_norm_group)"
        )
    num = num_per_img.reshape(-1, g).sum(1)
    den = den_per_img.reshape(-1, g).sum(1)
    return jnp.mean(num / jnp.maximum(den, 1.0))


# -------------------------------------------------------------------------------- RPN loss
def rpn_targets(
    anchors: Array,
    anchor_valid: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    pos_iou_thr: float = 0.7,
    neg_iou_thr: float = 0.3,
    min_pos_iou: float = 0.3,
    match_low_quality: bool = True,
    num: int = 256,
    pos_fraction: float = 0.5,
    target_means: Sequence[float] = ZERO_MEANS,
    target_stds: Sequence[float] = RPN_STDS,
) -> dict[str, Array]:
    """Sampled RPN targets of ONE image (mmdetection `AnchorHead._get_targets_single`).

    Args: anchors `[N, 4]`; anchor_valid `[N] bool` (mmdetection's inside flags);
      gt_boxes `[G, 4]`; gt_valid `[G] bool`; key: PRNG key for the sampler.
    Returns dict: `assigned [N]` (`fgd_jax.ops.assign` encoding), `inds [num] int32` (sampled
      anchors, positives first), `valid [num] bool`,
      `pos [num] bool`, `bbox_targets [num, 4]` (0 off positives), `num_pos`, `num_neg` scalars.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    assigned, _ = assign_ops.max_iou_assign(
        anchors,
        gt_boxes,
        gt_valid,
        pos_iou_thr,
        neg_iou_thr,
        min_pos_iou,
        match_low_quality=match_low_quality,
        anchor_valid=anchor_valid,
    )
    inds, valid, pos = sample_assigned(assigned, num, pos_fraction, key)
    gt_idx = jnp.clip(assigned[inds], 0, gt_boxes.shape[0] - 1)
    targets = box_ops.delta_encode(anchors[inds], gt_boxes[gt_idx], target_means, target_stds)
    targets = jnp.where(pos[:, None], targets, 0.0)
    return dict(
        assigned=assigned,
        inds=inds,
        valid=valid,
        pos=pos,
        bbox_targets=targets,
        num_pos=jnp.sum(pos),
        num_neg=jnp.sum(valid & ~pos),
    )


def rpn_batch_targets(
    anchors: Array,
    anchor_valid: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    **target_kw: Any,
) -> dict[str, Array]:
    """`rpn_targets` for a batch: anchors `[N, 4]` (shared), anchor_valid `[B, N]`,
    gt_boxes `[B, G, 4]`, gt_valid `[B, G]`, key: one PRNG key (split per image)."""
    anchors = jnp.asarray(anchors, jnp.float32)
    keys = jax.random.split(key, jnp.shape(gt_boxes)[0])
    return jax.vmap(lambda v, b, gv, k: rpn_targets(anchors, v, b, gv, k, **target_kw))(
        jnp.asarray(anchor_valid, bool), jnp.asarray(gt_boxes, jnp.float32), gt_valid, keys
    )


def rpn_loss(
    cls_scores: Array,
    bbox_preds: Array,
    targets: dict[str, Array],
    loss_norm_group: int = 0,
    loss_cls_weight: float = 1.0,
    loss_bbox_weight: float = 1.0,
) -> dict[str, Array]:
    """mmdetection 2.11 `RPNHead.loss` (sigmoid BCE + L1 on the sampled anchors).

    Args: cls_scores `[B, N]` logits; bbox_preds `[B, N, 4]`; targets: `rpn_batch_targets`.
    Returns {'loss_rpn_cls', 'loss_rpn_bbox'}: sums over sampled anchors divided by
      `sum_i max(pos_i, 1) + max(neg_i, 1)` (mmdetection's `num_total_samples`).
    """
    cls_scores = jnp.asarray(cls_scores, jnp.float32)
    bbox_preds = jnp.asarray(bbox_preds, jnp.float32)
    logits = jnp.take_along_axis(cls_scores, targets["inds"], axis=1)  # [B, num]
    deltas = jnp.take_along_axis(bbox_preds, targets["inds"][..., None], axis=1)  # [B, num, 4]
    w = targets["valid"].astype(jnp.float32)
    pos = targets["pos"].astype(jnp.float32)
    bce = loss_ops.binary_cross_entropy_with_logits(logits, pos)
    cls_per_img = jnp.sum(bce * w, axis=1)
    l1 = loss_ops.l1_loss(deltas, targets["bbox_targets"])
    bbox_per_img = jnp.sum(l1 * pos[..., None], axis=(1, 2))
    den = jnp.maximum(targets["num_pos"], 1) + jnp.maximum(targets["num_neg"], 1)
    den = den.astype(jnp.float32)
    return dict(
        loss_rpn_cls=loss_cls_weight * _group_mean(cls_per_img, den, loss_norm_group),
        loss_rpn_bbox=loss_bbox_weight * _group_mean(bbox_per_img, den, loss_norm_group),
    )


# ------------------------------------------------------------------------------- proposals
def rpn_proposals(
    cls_scores: Sequence[Array],
    bbox_preds: Sequence[Array],
    anchors: Sequence[Array],
    img_shape: Array,
    nms_pre: int = 1000,
    max_per_img: int = 1000,
    iou_threshold: float = 0.7,
    min_bbox_size: float = 0.0,
    anchor_valid: Sequence[Array] | None = None,
    target_means: Sequence[float] = ZERO_MEANS,
    target_stds: Sequence[float] = RPN_STDS,
    wh_ratio_clip: float = 16 / 1000,
) -> dict[str, Array]:
    """mmdetection 2.11 `RPNHead._get_bboxes` with static shapes.

    Args:
      cls_scores / bbox_preds: per level `[B, H, W, A]` logits / `[B, H, W, A*4]` deltas.
      anchors: per level `[H*W*A, 4]`. img_shape: `[B, 2]` (h, w) of the resized image.
      anchor_valid: optional per level `[B, H*W*A] bool`; invalid anchors never become
        proposals (our canvas can be larger than mmdetection's per-image padded shape).
    Returns: dict(boxes `[B, max_per_img, 4]` xyxy resized-image pixels, scores `[B, K]`
      (sigmoid), valid `[B, K] bool`), sorted by score, gradients stopped.
    """
    img_shape = jnp.asarray(img_shape)
    batch = cls_scores[0].shape[0]
    all_boxes, all_scores, all_valid, all_ids = [], [], [], []
    for lvl, (cls, reg, anc) in enumerate(zip(cls_scores, bbox_preds, anchors, strict=True)):
        logits = jax.lax.stop_gradient(cls.reshape(batch, -1).astype(jnp.float32))
        deltas = jax.lax.stop_gradient(reg.reshape(batch, -1, 4).astype(jnp.float32))
        ok = (
            jnp.ones(logits.shape, bool)
            if anchor_valid is None
            else jnp.asarray(anchor_valid[lvl], bool)
        )
        scores = jax.nn.sigmoid(logits)
        anc = jnp.broadcast_to(anc[None], (batch, *anc.shape))
        if 0 < nms_pre < scores.shape[1]:
            _, idx = jax.lax.top_k(jnp.where(ok, scores, -1.0), nms_pre)
            scores = jnp.take_along_axis(scores, idx, axis=1)
            ok = jnp.take_along_axis(ok, idx, axis=1)
            deltas = jnp.take_along_axis(deltas, idx[..., None], axis=1)
            anc = jnp.take_along_axis(anc, idx[..., None], axis=1)
        boxes = jax.vmap(
            lambda a, d, s: box_ops.delta_decode(
                a, d, target_means, target_stds, max_shape=s, wh_ratio_clip=wh_ratio_clip
            )
        )(anc, deltas, img_shape)
        all_boxes.append(boxes)
        all_scores.append(scores)
        all_valid.append(ok)
        all_ids.append(jnp.full(scores.shape, lvl, jnp.int32))
    boxes = jnp.concatenate(all_boxes, axis=1)
    scores = jnp.concatenate(all_scores, axis=1)
    valid = jnp.concatenate(all_valid, axis=1)
    ids = jnp.concatenate(all_ids, axis=1)
    if min_bbox_size > 0:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        valid = valid & (w >= min_bbox_size) & (h >= min_bbox_size)

    def one(b, s, i, v):
        keep, keep_valid = nms_ops.batched_nms(b, s, i, v, iou_threshold, max_per_img)
        keep_valid = keep_valid & v[keep]
        return (
            jnp.where(keep_valid[:, None], b[keep], 0.0),
            jnp.where(keep_valid, s[keep], 0.0),
            keep_valid,
        )

    out_boxes, out_scores, out_valid = jax.vmap(one)(boxes, scores, ids, valid)
    return dict(
        boxes=jax.lax.stop_gradient(out_boxes),
        scores=jax.lax.stop_gradient(out_scores),
        valid=out_valid,
    )


# ---------------------------------------------------------------------------- RoI features
def extract_roi_feats(
    feats: Sequence[Array],
    rois: Array,
    strides: Sequence[int] = (4, 8, 16, 32),
    output_size: int = 7,
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
) -> Array:
    """mmdetection `SingleRoIExtractor` (RoIAlign, level `map_roi_levels`), static shapes.

    Args: feats: the first `len(strides)` FPN maps `[B, H_l, W_l, C]`; rois `[B, R, 4]` xyxy
      pixels of the network input (padded RoIs are zeros; their features are discarded by the
      callers). Returns `[B, R, S, S, C]` float32.
    """
    if len(feats) != len(strides):
        raise ValueError(f"extract_roi_feats: {len(feats)} feature maps, {len(strides)} strides")
    out = roi_ops.multi_level_roi_align(
        [f.astype(jnp.float32) for f in feats],
        jnp.asarray(rois, jnp.float32),
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
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.5,
    min_pos_iou: float = 0.5,
    match_low_quality: bool = False,
    num: int = 512,
    pos_fraction: float = 0.25,
    add_gt_as_proposals: bool = True,
    target_means: Sequence[float] = ZERO_MEANS,
    target_stds: Sequence[float] = RCNN_STDS,
) -> dict[str, Array]:
    """Sampled RoI-head targets of ONE image (mmdetection `StandardRoIHead` assign + sample,
    `BBoxHead.get_targets`).

    The proposals are assigned first; with `add_gt_as_proposals` the valid GT boxes are then
    put in front of them, each assigned to itself (mmdetection `AssignResult.add_gt_`).
    Args: proposals `[P, 4]`, proposal_valid `[P]`, gt_boxes `[G, 4]`, gt_labels `[G]`,
      gt_valid `[G]`, key: PRNG key.
    Returns dict: `assigned` (`[G + P]` with GT added, else `[P]`), `rois [num, 4]`,
      `valid [num]`, `pos [num]`, `labels [num] int32` (class, or
      `num_classes` for background and padding), `bbox_targets [num, 4]`.
    """
    proposals = jnp.asarray(proposals, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    gt_valid = jnp.asarray(gt_valid, bool)
    assigned, overlaps = assign_ops.max_iou_assign(
        proposals,
        gt_boxes,
        gt_valid,
        pos_iou_thr,
        neg_iou_thr,
        min_pos_iou,
        match_low_quality=match_low_quality,
        anchor_valid=proposal_valid,
    )
    pool = proposals
    if add_gt_as_proposals:
        pool, _, assigned, _, _ = sampling_ops.add_gt_as_proposals(
            proposals, proposal_valid, assigned, overlaps, gt_boxes, gt_valid
        )
    inds, valid, pos = sample_assigned(assigned, num, pos_fraction, key)
    rois = jnp.where(valid[:, None], pool[inds], 0.0)
    gt_idx = jnp.clip(assigned[inds], 0, gt_boxes.shape[0] - 1)
    labels = jnp.where(pos, gt_labels[gt_idx], num_classes).astype(jnp.int32)
    targets = box_ops.delta_encode(rois, gt_boxes[gt_idx], target_means, target_stds)
    targets = jnp.where(pos[:, None], targets, 0.0)
    return dict(
        assigned=assigned, rois=rois, valid=valid, pos=pos, labels=labels, bbox_targets=targets
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
    valid = jnp.asarray(targets["valid"]).astype(jnp.float32)
    pos = jnp.asarray(targets["pos"]).astype(jnp.float32)
    bbox_pred = jnp.asarray(bbox_pred, jnp.float32)
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
        loss_cls=loss_cls_weight * _group_mean(cls_per_img, den, loss_norm_group),
        loss_bbox=loss_bbox_weight * _group_mean(bbox_per_img, den, loss_norm_group),
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
    target_stds: Sequence[float] = RCNN_STDS,
    score_thr: float = 0.05,
    iou_threshold: float = 0.5,
    max_per_img: int = 100,
    max_candidates: int = 4000,
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
    scores = jax.nn.softmax(cls_score.astype(jnp.float32), axis=-1)[..., :num_classes]
    scores = jnp.where(roi_valid[..., None], scores, 0.0)
    boxes = jax.vmap(
        lambda r, d, s: box_ops.delta_decode(r, d, target_means, target_stds, max_shape=s)
    )(rois, bbox_pred.astype(jnp.float32), jnp.asarray(img_shape))
    b, r = boxes.shape[:2]
    boxes = boxes.reshape(b, r, num_classes, 4)
    if rescale:
        sf = jnp.asarray(scale_factor, jnp.float32)
        boxes = boxes / sf[:, None, None, :]

    def one(bx, sc):  # class-specific boxes [R, C, 4], scores [R, C]
        dets = nms_ops.multiclass_nms(
            bx, sc, None, score_thr, iou_threshold, max_per_img, max_candidates=max_candidates
        )
        return {k: v for k, v in dets.items() if k != "index"}

    return jax.vmap(one)(boxes, scores)


# -------------------------------------------------------------------------------- detector
class FasterRCNN(nn.Module):
    """mmdetection 2.x `FasterRCNN` implementing the detector API of docs/contracts.md.

    Build with `FasterRCNN.from_config(fgd_jax.config.faster_rcnn_model(...))` or by hand.
    `train_cfg` / `test_cfg` are plain dicts of the settings (see `faster_rcnn_model`).
    """

    backbone: nn.Module
    neck: nn.Module
    rpn_head: RPNHead
    roi_head: StandardRoIHead
    num_classes: int = 80
    anchor_strides: Sequence[int] = (4, 8, 16, 32, 64)
    anchor_scales: Sequence[float] = (8.0,)
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    roi_strides: Sequence[int] = (4, 8, 16, 32)
    roi_output_size: int = 7
    roi_sampling_ratio: int = 0
    roi_aligned: bool = True
    finest_scale: float = 56.0
    rcnn_target_stds: Sequence[float] = RCNN_STDS
    # train: RPN
    rpn_pos_iou_thr: float = 0.7
    rpn_neg_iou_thr: float = 0.3
    rpn_min_pos_iou: float = 0.3
    rpn_num: int = 256
    rpn_pos_fraction: float = 0.5
    train_nms_pre: int = 2000
    train_max_proposals: int = 1000
    # train: RoI head
    rcnn_pos_iou_thr: float = 0.5
    rcnn_neg_iou_thr: float = 0.5
    rcnn_min_pos_iou: float = 0.5
    rcnn_num: int = 512
    rcnn_pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    size_divisor: int = 32
    loss_norm_group: int = 0
    # test
    test_nms_pre: int = 1000
    test_max_proposals: int = 1000
    rpn_iou_threshold: float = 0.7
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    max_candidates: int = 4000

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> FasterRCNN:
        """Build from `fgd_jax.config.faster_rcnn_model(...)`; `dtype` is the compute dtype."""
        from fgd_jax.models.fpn import build_neck
        from fgd_jax.models.resnet import build_backbone

        for key in ("backbone", "neck", "rpn_head", "roi_head", "num_classes"):
            if key not in model_cfg:
                raise ValueError(f"faster_rcnn model config: missing key {key!r}")
        rpn, roi = model_cfg.rpn_head, model_cfg.roi_head
        empty = ml_collections.ConfigDict()
        train_cfg = model_cfg.get("train_cfg", empty)
        test_cfg = model_cfg.get("test_cfg", empty)
        t_rpn = train_cfg.get("rpn", empty)
        t_prop = train_cfg.get("rpn_proposal", empty)
        t_rcnn = train_cfg.get("rcnn", empty)
        e_rpn = test_cfg.get("rpn", empty)
        e_rcnn = test_cfg.get("rcnn", empty)
        if float(t_prop.get("iou_threshold", 0.7)) != float(e_rpn.get("iou_threshold", 0.7)):
            raise ValueError("faster_rcnn model config: train and test RPN NMS thresholds differ")
        num_anchors = len(rpn.anchor_ratios) * len(rpn.anchor_scales)
        return cls(
            backbone=build_backbone(model_cfg.backbone, dtype=dtype),
            neck=build_neck(model_cfg.neck, dtype=dtype),
            rpn_head=RPNHead(num_anchors, int(rpn.feat_channels), dtype=dtype),
            roi_head=StandardRoIHead(
                Shared2FCBBoxHead(
                    model_cfg.num_classes,
                    int(roi.fc_out_channels),
                    int(roi.get("num_shared_fcs", 2)),
                    dtype=dtype,
                )
            ),
            num_classes=int(model_cfg.num_classes),
            anchor_strides=tuple(rpn.anchor_strides),
            anchor_scales=tuple(float(s) for s in rpn.anchor_scales),
            anchor_ratios=tuple(float(r) for r in rpn.anchor_ratios),
            roi_strides=tuple(roi.featmap_strides),
            roi_output_size=int(roi.output_size),
            roi_sampling_ratio=int(roi.sampling_ratio),
            roi_aligned=bool(roi.aligned),
            finest_scale=float(roi.finest_scale),
            rcnn_target_stds=tuple(roi.target_stds),
            rpn_pos_iou_thr=float(t_rpn.get("pos_iou_thr", 0.7)),
            rpn_neg_iou_thr=float(t_rpn.get("neg_iou_thr", 0.3)),
            rpn_min_pos_iou=float(t_rpn.get("min_pos_iou", 0.3)),
            rpn_num=int(t_rpn.get("num", 256)),
            rpn_pos_fraction=float(t_rpn.get("pos_fraction", 0.5)),
            train_nms_pre=int(t_prop.get("nms_pre", 2000)),
            train_max_proposals=int(t_prop.get("max_per_img", 1000)),
            rcnn_pos_iou_thr=float(t_rcnn.get("pos_iou_thr", 0.5)),
            rcnn_neg_iou_thr=float(t_rcnn.get("neg_iou_thr", 0.5)),
            rcnn_min_pos_iou=float(t_rcnn.get("min_pos_iou", 0.5)),
            rcnn_num=int(t_rcnn.get("num", 512)),
            rcnn_pos_fraction=float(t_rcnn.get("pos_fraction", 0.25)),
            add_gt_as_proposals=bool(t_rcnn.get("add_gt_as_proposals", True)),
            size_divisor=int(train_cfg.get("size_divisor", 32)),
            loss_norm_group=int(train_cfg.get("loss_norm_group", 0)),
            test_nms_pre=int(e_rpn.get("nms_pre", 1000)),
            test_max_proposals=int(e_rpn.get("max_per_img", 1000)),
            rpn_iou_threshold=float(e_rpn.get("iou_threshold", 0.7)),
            min_bbox_size=float(e_rpn.get("min_bbox_size", 0.0)),
            score_thr=float(e_rcnn.get("score_thr", 0.05)),
            iou_threshold=float(e_rcnn.get("iou_threshold", 0.5)),
            max_per_img=int(e_rcnn.get("max_per_img", 100)),
            max_candidates=int(e_rcnn.get("max_candidates", 4000)),
        )

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    # ---------------------------------------------------------------------- building blocks
    def extract_feat(self, images: Array, train: bool = False) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> FPN maps P2..P6, NHWC, finest first."""
        return tuple(self.neck(self.backbone(images, train=train)))

    def anchors(self, feat_shapes: Sequence[tuple[int, int]]) -> list[Array]:
        """RPN anchors per level for the given feature shapes."""
        return rpn_anchors(feat_shapes, self.anchor_strides, self.anchor_scales, self.anchor_ratios)

    def _anchor_valid(self, shapes: Sequence[tuple[int, int]], img_shape: Array) -> list[Array]:
        flags = anchor_valid_flags(
            shapes, self.anchor_strides, self.num_anchors, img_shape, self.size_divisor
        )
        sizes = [h * w * self.num_anchors for h, w in shapes]
        return jnp.split(flags, list(itertools.accumulate(sizes))[:-1], axis=1)

    def proposals(
        self,
        rpn_cls: Sequence[Array],
        rpn_reg: Sequence[Array],
        img_shape: Array,
        train: bool = False,
    ) -> dict[str, Array]:
        """`rpn_proposals` with this model's train (`train=True`) or test settings."""
        shapes = [tuple(c.shape[1:3]) for c in rpn_cls]
        return rpn_proposals(
            rpn_cls,
            rpn_reg,
            self.anchors(shapes),
            img_shape,
            nms_pre=self.train_nms_pre if train else self.test_nms_pre,
            max_per_img=self.train_max_proposals if train else self.test_max_proposals,
            iou_threshold=self.rpn_iou_threshold,
            min_bbox_size=self.min_bbox_size,
            anchor_valid=self._anchor_valid(shapes, img_shape),
        )

    def roi_feats(self, feats: Sequence[Array], rois: Array) -> Array:
        """RoIAlign features `[B, R, S, S, C]` for `rois [B, R, 4]`."""
        return extract_roi_feats(
            feats[: len(self.roi_strides)],
            rois,
            self.roi_strides,
            self.roi_output_size,
            self.roi_sampling_ratio,
            self.roi_aligned,
            self.finest_scale,
        )

    # ---------------------------------------------------------------------------- the API
    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """Full test-mode forward. `[B, H, W, 3]` -> dict(features, rpn_cls_scores
        `[B,H,W,A]` per level, rpn_bbox_preds, proposals (boxes, scores, valid), cls_score
        `[B, R, C+1]`, bbox_pred `[B, R, 4C]`) with R = test max proposals. The image is taken
        as unpadded (img_shape = the canvas); `predict` uses the real image shapes."""
        b, h, w = images.shape[:3]
        img_shape = jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
        return self._forward_test(images, img_shape)

    def _forward_test(self, images: Array, img_shape: Array) -> dict[str, Any]:
        feats = self.extract_feat(images, train=False)
        rpn_cls, rpn_reg = self.rpn_head(feats)
        if self.is_initializing():
            # `init` only needs the parameter shapes: skip NMS and RoIAlign (slow when `init`
            # runs eagerly), feed the box head placeholder RoI features instead.
            b, k, s = images.shape[0], self.test_max_proposals, self.roi_output_size
            props = dict(
                boxes=jnp.zeros((b, k, 4)), scores=jnp.zeros((b, k)), valid=jnp.zeros((b, k), bool)
            )
            roi_feats = jnp.zeros((b, k, s, s, feats[0].shape[-1]), jnp.float32)
        else:
            props = self.proposals(rpn_cls, rpn_reg, img_shape, train=False)
            roi_feats = self.roi_feats(feats, props["boxes"])
        cls_score, bbox_pred = self.roi_head(roi_feats)
        return dict(
            features=feats,
            rpn_cls_scores=rpn_cls,
            rpn_bbox_preds=rpn_reg,
            proposals=props,
            cls_score=cls_score,
            bbox_pred=bbox_pred,
        )

    def forward_train(
        self, batch: dict[str, Array], train: bool = True
    ) -> tuple[dict[str, Array], tuple[Array, ...]]:
        """Batch dict (docs/contracts.md) -> ({'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls',
        'loss_bbox'}, FPN features P2..P6). Needs the `'sampler'` rng stream."""
        for key in ("image", "boxes", "labels", "valid", "img_shape"):
            if key not in batch:
                raise KeyError(f"FasterRCNN.forward_train: batch has no {key!r} (see contracts)")
        img_shape = jnp.asarray(batch["img_shape"])
        gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
        gt_labels = jnp.asarray(batch["labels"], jnp.int32)
        gt_valid = jnp.asarray(batch["valid"], bool)
        key_rpn, key_rcnn = jax.random.split(self.make_rng("sampler"))

        feats = self.extract_feat(batch["image"], train=train)
        rpn_cls, rpn_reg = self.rpn_head(feats)
        batch_size = rpn_cls[0].shape[0]
        shapes = [tuple(c.shape[1:3]) for c in rpn_cls]
        anchors = jnp.concatenate(self.anchors(shapes), axis=0)
        anchor_valid = anchor_valid_flags(
            shapes, self.anchor_strides, self.num_anchors, img_shape, self.size_divisor
        )
        rpn_t = rpn_batch_targets(
            anchors,
            anchor_valid,
            gt_boxes,
            gt_valid,
            key_rpn,
            pos_iou_thr=self.rpn_pos_iou_thr,
            neg_iou_thr=self.rpn_neg_iou_thr,
            min_pos_iou=self.rpn_min_pos_iou,
            num=self.rpn_num,
            pos_fraction=self.rpn_pos_fraction,
        )
        losses = rpn_loss(
            jnp.concatenate([c.reshape(batch_size, -1) for c in rpn_cls], axis=1),
            jnp.concatenate([r.reshape(batch_size, -1, 4) for r in rpn_reg], axis=1),
            rpn_t,
            self.loss_norm_group,
        )

        props = self.proposals(rpn_cls, rpn_reg, img_shape, train=True)
        keys = jax.random.split(key_rcnn, batch_size)
        targets = jax.vmap(
            lambda p, pv, b, lab, gv, k: rcnn_targets(
                p,
                pv,
                b,
                lab,
                gv,
                k,
                self.num_classes,
                self.rcnn_pos_iou_thr,
                self.rcnn_neg_iou_thr,
                self.rcnn_min_pos_iou,
                False,
                self.rcnn_num,
                self.rcnn_pos_fraction,
                self.add_gt_as_proposals,
                ZERO_MEANS,
                self.rcnn_target_stds,
            )
        )(props["boxes"], props["valid"], gt_boxes, gt_labels, gt_valid, keys)
        cls_score, bbox_pred = self.roi_head(self.roi_feats(feats, targets["rois"]))
        losses.update(
            rcnn_loss(cls_score, bbox_pred, targets, self.num_classes, self.loss_norm_group)
        )
        return losses, feats

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Detections in ORIGINAL image pixels: dict(boxes [B,K,4], scores [B,K],
        labels [B,K] int32, valid [B,K] bool), K = max_per_img."""
        outs = self._forward_test(images, jnp.asarray(img_shape))
        return self.postprocess(outs, img_shape, scale_factor)

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`rcnn_postprocess` with this model's settings on test-forward outputs."""
        return rcnn_postprocess(
            outs["cls_score"],
            outs["bbox_pred"],
            outs["proposals"]["boxes"],
            outs["proposals"]["valid"],
            img_shape,
            scale_factor,
            self.num_classes,
            ZERO_MEANS,
            self.rcnn_target_stds,
            self.score_thr,
            self.iou_threshold,
            self.max_per_img,
            self.max_candidates,
        )

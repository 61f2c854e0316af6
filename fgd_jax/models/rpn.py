"""The region proposal network of two-stage detectors (mmdetection 2.x / 2.11 `RPNHead`), NHWC,
Flax Linen, static shapes: the head, its anchors, sampled targets and loss, and proposals.

- `RPNHead`: 3x3 conv + ReLU (`rpn_conv`), `rpn_cls` (one sigmoid logit per anchor), `rpn_reg`
  (4 deltas per anchor); it also holds its anchor settings (scale 8, ratios 0.5/1/2, strides
  4..64; mmdetection `AnchorGenerator`, index `(y*W + x)*A + a`).
- Targets (`rpn_targets`): MaxIoUAssigner(0.7, 0.3, min_pos_iou 0.3, low-quality matches) on
  the anchors inside mmdetection's per-image padded extent, random sampling of 256 (positive
  fraction 0.5); loss (`rpn_loss`): BCE + L1 both divided by the number of sampled anchors
  (`sum_i max(pos_i, 1) + max(neg_i, 1)`), per group of `loss_norm_group` images.
- Proposals (`rpn_proposals`, mmdetection 2.11 `RPNHead._get_bboxes`): per level the top
  `nms_pre` anchors by score, decode + clip to `img_shape`, boxes with `w or h < min_bbox_size`
  dropped only when `min_bbox_size > 0` (2.11 uses `>=` to keep), one NMS over all levels with
  the level index as the "class" (mmcv `batched_nms`), keep `max_per_img`. Static shapes:
  `[B, max_per_img, 4]` with a `valid` mask, sorted by score, under `stop_gradient`.

Used by `fgd_jax.models.faster_rcnn` (and next by Mask R-CNN / Cascade R-CNN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgd_jax.models.dense_heads import group_mean, top_candidates
from fgd_jax.ops import anchors as anchor_ops
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import nms as nms_ops
from fgd_jax.ops.sampling import sample_assigned

Array = jax.Array

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
ZERO_MEANS = (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------ head
class RPNHead(nn.Module):
    """mmdetection `RPNHead` (sigmoid objectness). Init: normal(std=0.01), bias 0.

    Attributes: num_anchors (None: `len(anchor_ratios) * len(anchor_scales)`); in_channels
      (checked against the maps when set); feat_channels (`rpn_conv` width); anchor_scales,
      anchor_ratios, anchor_strides: the anchor generator's settings.
    Call: tuple of NHWC maps `[B, H_l, W_l, C]` -> (cls_scores, bbox_preds): tuples of
      `[B, H_l, W_l, A]` logits and `[B, H_l, W_l, A*4]` deltas, float32.
    """

    num_anchors: int | None = None
    in_channels: int | None = None
    feat_channels: int = 256
    anchor_scales: Sequence[float] = (8.0,)
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    anchor_strides: Sequence[int] = (4, 8, 16, 32, 64)
    dtype: Any = None

    @property
    def anchors_per_cell(self) -> int:
        """`num_anchors`, or `len(anchor_ratios) * len(anchor_scales)` when unset."""
        if self.num_anchors is not None:
            return self.num_anchors
        return len(self.anchor_ratios) * len(self.anchor_scales)

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"RPNHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config rpn_head.in_channels vs neck)"
            )
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
        rpn_cls = conv(self.anchors_per_cell, 1, "rpn_cls")
        rpn_reg = conv(self.anchors_per_cell * 4, 1, "rpn_reg")
        cls_scores, bbox_preds = [], []
        for x in feats:
            h = nn.relu(rpn_conv(x))
            cls, reg = rpn_cls(h), rpn_reg(h)
            cls_scores.append(cls.astype(dtypes.float_dtype(cls)))
            bbox_preds.append(reg.astype(dtypes.float_dtype(reg)))
        return tuple(cls_scores), tuple(bbox_preds)


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class RPNTrainCfg:
    """RPN targets (model config `train_cfg.rpn`): MaxIoUAssigner thresholds (low-quality
    matches on) and the random sampler (`num` anchors per image, `pos_fraction` positives)."""

    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    num: int = 256
    pos_fraction: float = 0.5


@dataclasses.dataclass(frozen=True)
class RPNProposalCfg:
    """Proposals while training (model config `train_cfg.rpn_proposal`): `nms_pre` anchors
    per level, NMS at `iou_threshold` (must equal the test one), `max_per_img` kept."""

    nms_pre: int = 2000
    max_per_img: int = 1000
    iou_threshold: float = 0.7


@dataclasses.dataclass(frozen=True)
class RPNTestCfg:
    """Proposals at test time (model config `test_cfg.rpn`); `min_bbox_size > 0` drops
    smaller boxes (also while training: mmdetection's configs use 0 for both)."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


_HEAD = RPNHead()  # the field defaults, read by the functions below
_TRAIN = RPNTrainCfg()
_TEST = RPNTestCfg()


# --------------------------------------------------------------------------------- anchors
def rpn_anchors(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = _HEAD.anchor_strides,
    scales: Sequence[float] = _HEAD.anchor_scales,
    ratios: Sequence[float] = _HEAD.anchor_ratios,
) -> list[Array]:
    """mmdetection RPN anchors per level: list of `[H_l*W_l*A, 4] float32` xyxy pixels."""
    return anchor_ops.multi_level_anchors(
        [tuple(s) for s in feat_shapes], strides=strides, scales=scales, ratios=ratios
    )


# -------------------------------------------------------------------------------- RPN loss
def rpn_targets(
    anchors: Array,
    anchor_valid: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    pos_iou_thr: float = _TRAIN.pos_iou_thr,
    neg_iou_thr: float = _TRAIN.neg_iou_thr,
    min_pos_iou: float = _TRAIN.min_pos_iou,
    match_low_quality: bool = True,
    num: int = _TRAIN.num,
    pos_fraction: float = _TRAIN.pos_fraction,
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
    dt = dtypes.float_dtype(anchors, gt_boxes)
    anchors = jnp.asarray(anchors, dt)
    gt_boxes = jnp.asarray(gt_boxes, dt)
    assigned, _ = assign_ops.max_iou_assign(
        anchors,
        gt_boxes,
        gt_valid,
        pos_iou_thr=pos_iou_thr,
        neg_iou_thr=neg_iou_thr,
        min_pos_iou=min_pos_iou,
        match_low_quality=match_low_quality,
        anchor_valid=anchor_valid,
    )
    inds, valid, pos = sample_assigned(assigned, num=num, pos_fraction=pos_fraction, key=key)
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
    dt = dtypes.float_dtype(anchors, gt_boxes)
    anchors = jnp.asarray(anchors, dt)
    keys = jax.random.split(key, jnp.shape(gt_boxes)[0])
    return jax.vmap(lambda v, b, gv, k: rpn_targets(anchors, v, b, gv, k, **target_kw))(
        jnp.asarray(anchor_valid, bool), jnp.asarray(gt_boxes, dt), gt_valid, keys
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
    dt = dtypes.float_dtype(cls_scores, bbox_preds)
    cls_scores = jnp.asarray(cls_scores, dt)
    bbox_preds = jnp.asarray(bbox_preds, dt)
    logits = jnp.take_along_axis(cls_scores, targets["inds"], axis=1)  # [B, num]
    deltas = jnp.take_along_axis(bbox_preds, targets["inds"][..., None], axis=1)  # [B, num, 4]
    w = targets["valid"].astype(dt)
    pos = targets["pos"].astype(dt)
    bce = loss_ops.binary_cross_entropy_with_logits(logits, pos)
    cls_per_img = jnp.sum(bce * w, axis=1)
    l1 = loss_ops.l1_loss(deltas, targets["bbox_targets"])
    bbox_per_img = jnp.sum(l1 * pos[..., None], axis=(1, 2))
    den = jnp.maximum(targets["num_pos"], 1) + jnp.maximum(targets["num_neg"], 1)
    den = den.astype(dt)
    return dict(
        loss_rpn_cls=loss_cls_weight
        * group_mean(cls_per_img, den, loss_norm_group, who="faster_rcnn loss"),
        loss_rpn_bbox=loss_bbox_weight
        * group_mean(bbox_per_img, den, loss_norm_group, who="faster_rcnn loss"),
    )


# ------------------------------------------------------------------------------- proposals
def rpn_proposals(
    cls_scores: Sequence[Array],
    bbox_preds: Sequence[Array],
    anchors: Sequence[Array],
    img_shape: Array,
    nms_pre: int = _TEST.nms_pre,
    max_per_img: int = _TEST.max_per_img,
    iou_threshold: float = _TEST.iou_threshold,
    min_bbox_size: float = _TEST.min_bbox_size,
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
        dt = dtypes.float_dtype(cls, reg)
        logits = jax.lax.stop_gradient(cls.reshape(batch, -1).astype(dt))
        deltas = jax.lax.stop_gradient(reg.reshape(batch, -1, 4).astype(dt))
        ok = (
            jnp.ones(logits.shape, bool)
            if anchor_valid is None
            else jnp.asarray(anchor_valid[lvl], bool)
        )
        scores = jax.nn.sigmoid(logits)
        anc = jnp.broadcast_to(anc[None], (batch, *anc.shape))
        if 0 < nms_pre < scores.shape[1]:
            key = jnp.where(ok, scores, -1.0)
            scores, ok, deltas, anc = top_candidates(key, nms_pre, scores, ok, deltas, anc)
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

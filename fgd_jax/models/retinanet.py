"""RetinaNet with mmdetection 2.x (2.11) semantics, NHWC, Flax Linen, static shapes under jit.

Pieces (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (ResNet/ResNeXt, C2..C5) -> `neck` (FPN, P3..P7) -> `bbox_head` (`RetinaHead`,
  one set of weights applied to every level).
- Anchors: mmdetection `AnchorGenerator` (octave_base_scale 4, 3 scales per octave, ratios
  0.5/1/2, centres at (x*stride, y*stride)); anchor index `(y*W + x)*A + a`, class channel
  `a*C + c`.
- Training (`retina_loss`): `MaxIoUAssigner` (pos 0.5, neg 0.4, min_pos_iou 0, low-quality
  matches), sigmoid focal loss over positive+negative anchors, L1 on the encoded deltas of the
  positives, both divided by `sum_i max(num_pos_i, 1)` (mmdetection `AnchorHead.get_targets`).
- Inference (`retina_postprocess`): per level the top `nms_pre` anchors by their best class
  score (mmdetection 2.11 `AnchorHead._get_bboxes`), decode + clip to `img_shape`, divide by
  `scale_factor`, then `multiclass_nms` (score > `score_thr`, class-wise NMS, `max_per_img`).

Loss normalisation across devices: mmdetection 2.11 normalises each GPU's loss by that GPU's
own positive count (no `reduce_mean`) and DDP averages the gradients, i.e. the loss is the mean
over GPUs of per-GPU normalised losses. `loss_norm_group=g` reproduces that for a per-GPU batch
of `g` images (mmdetection's configs: `samples_per_gpu=2`): the global batch is cut into groups
of `g` consecutive images, each normalised by its own count, and the groups are averaged.
`loss_norm_group=0` normalises the whole global batch by its total count instead.
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
    group_mean,
    top_candidates,
)
from fgd_jax.models.layers import ConvModule, head_out_conv, head_tower
from fgd_jax.models.single_stage import SingleStageDetector
from fgd_jax.ops import anchors as anchor_ops
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops

Array = jax.Array


# ------------------------------------------------------------------------------------ head
class RetinaHead(nn.Module):
    """mmdetection `RetinaHead`: `stacked_convs` 3x3 conv+ReLU towers for classification and
    regression, then `retina_cls` (A*C channels) and `retina_reg` (A*4 channels).

    Init as mmdetection: every conv normal(std=0.01), bias 0; `retina_cls` bias
    `-log((1 - prior_prob) / prior_prob)`. The head also holds the settings of its anchors,
    box coder and losses (as mmdetection's head does); the detector reads them from here.
    Call: tuple of NHWC maps `[B, H_l, W_l, in_ch]` -> (cls_scores, bbox_preds), tuples of
      `[B, H_l, W_l, A*C]` and `[B, H_l, W_l, A*4]` float32 (float64 in a float64 run)
      logits / deltas.
    """

    num_classes: int
    num_anchors: int | None = None  # None: len(ratios) * scales_per_octave
    in_channels: int | None = None  # checked against the maps when set
    feat_channels: int = 256
    stacked_convs: int = 4
    prior_prob: float = 0.01
    # anchors (mmdetection `AnchorGenerator`)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: Sequence[float] = (0.5, 1.0, 2.0)
    strides: Sequence[int] = (8, 16, 32, 64, 128)
    # box coder (`DeltaXYWHBBoxCoder`)
    target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    wh_ratio_clip: float = 16 / 1000
    # losses (focal + L1)
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    dtype: Any = None

    @property
    def anchors_per_cell(self) -> int:
        """`num_anchors`, or `len(ratios) * scales_per_octave` when unset."""
        if self.num_anchors is not None:
            return self.num_anchors
        return len(self.ratios) * self.scales_per_octave

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"RetinaHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config head.in_channels vs neck)"
            )
        init = nn.initializers.normal(0.01)

        def tower(prefix: str) -> list[ConvModule]:
            return head_tower(
                prefix, self.stacked_convs, self.feat_channels, dtype=self.dtype, kernel_init=init
            )

        def out_conv(features: int, bias: float, name: str) -> nn.Conv:
            return head_out_conv(features, bias, name, dtype=self.dtype, kernel_init=init)

        cls_convs, reg_convs = tower("cls_convs"), tower("reg_convs")
        bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
        retina_cls = out_conv(self.anchors_per_cell * self.num_classes, bias_cls, "retina_cls")
        retina_reg = out_conv(self.anchors_per_cell * 4, 0.0, "retina_reg")
        cls_scores, bbox_preds = [], []
        for x in feats:
            c = r = x
            for conv in cls_convs:
                c = conv(c)
            for conv in reg_convs:
                r = conv(r)
            cls, reg = retina_cls(c), retina_reg(r)
            cls_scores.append(cls.astype(dtypes.float_dtype(cls)))
            bbox_preds.append(reg.astype(dtypes.float_dtype(reg)))
        return tuple(cls_scores), tuple(bbox_preds)


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class RetinaTrainCfg:
    """Training settings (model config `train_cfg`): `MaxIoUAssigner` thresholds (low-quality
    matches on, no sampling), `size_divisor` of the anchor valid flags (see
    `anchor_valid_flags`) and the loss normaliser's group size (module docstring)."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.4
    min_pos_iou: float = 0.0
    size_divisor: int = 32
    loss_norm_group: int = 0


_HEAD = RetinaHead(num_classes=1)  # the field defaults, read by the functions below
_TRAIN = RetinaTrainCfg()
_TEST = DenseTestCfg()


# --------------------------------------------------------------------------------- anchors
def retina_anchors(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = _HEAD.strides,
    octave_base_scale: float = _HEAD.octave_base_scale,
    scales_per_octave: int = _HEAD.scales_per_octave,
    ratios: Sequence[float] = _HEAD.ratios,
) -> list[Array]:
    """mmdetection RetinaNet anchors per level: list of `[H_l*W_l*A, 4] float32` xyxy pixels of
    the network input, index `(y*W + x)*A + a` with `a = ratio_index*S + scale_index`."""
    scales = anchor_ops.retinanet_scales(octave_base_scale, scales_per_octave)
    return anchor_ops.multi_level_anchors(
        [tuple(s) for s in feat_shapes], strides=strides, ratios=ratios, scales=scales
    )


# ------------------------------------------------------------------------------------ loss
def retina_targets(
    anchors: Array,
    anchor_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    pos_iou_thr: float = _TRAIN.pos_iou_thr,
    neg_iou_thr: float = _TRAIN.neg_iou_thr,
    min_pos_iou: float = _TRAIN.min_pos_iou,
    target_means: Sequence[float] = _HEAD.target_means,
    target_stds: Sequence[float] = _HEAD.target_stds,
) -> dict[str, Array]:
    """Targets of ONE image (vmap for a batch), mmdetection `AnchorHead._get_targets_single`
    with `MaxIoUAssigner` and no sampling.

    Args:
      anchors: `[N, 4] float32` xyxy; anchor_valid: `[N] bool` (valid flags; invalid anchors are
        left out of the assignment as mmdetection's `inside_flags` with allowed_border=-1).
      gt_boxes: `[G, 4]` xyxy; gt_labels: `[G] int32`; gt_valid: `[G] bool` (padding never
        matched).
    Returns: dict of `labels [N] int32` (class, or `num_classes` for background),
      `pos [N] bool`, `neg [N] bool`, `bbox_targets [N, 4]` (encoded deltas; 0 off positives).
    """
    assigned, _ = assign_ops.max_iou_assign(
        anchors,
        gt_boxes,
        gt_valid,
        pos_iou_thr=pos_iou_thr,
        neg_iou_thr=neg_iou_thr,
        min_pos_iou=min_pos_iou,
        anchor_valid=anchor_valid,
    )
    pos = (assigned >= 0) & anchor_valid
    neg = (assigned == assign_ops.NEGATIVE) & anchor_valid
    idx = jnp.clip(assigned, 0, gt_boxes.shape[0] - 1)
    matched = jnp.where(pos[:, None], gt_boxes[idx], anchors)  # keeps the log() finite
    labels = jnp.where(pos, gt_labels[idx], num_classes).astype(jnp.int32)
    deltas = box_ops.delta_encode(anchors, matched, target_means, target_stds)
    deltas = jnp.where(pos[:, None], deltas, 0.0)
    return dict(labels=labels, pos=pos, neg=neg, bbox_targets=deltas)


def retina_loss(
    cls_scores: Array,
    bbox_preds: Array,
    anchors: Array,
    anchor_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    pos_iou_thr: float = _TRAIN.pos_iou_thr,
    neg_iou_thr: float = _TRAIN.neg_iou_thr,
    min_pos_iou: float = _TRAIN.min_pos_iou,
    target_means: Sequence[float] = _HEAD.target_means,
    target_stds: Sequence[float] = _HEAD.target_stds,
    focal_gamma: float = _HEAD.focal_gamma,
    focal_alpha: float = _HEAD.focal_alpha,
    loss_cls_weight: float = _HEAD.loss_cls_weight,
    loss_bbox_weight: float = _HEAD.loss_bbox_weight,
    loss_norm_group: int = _TRAIN.loss_norm_group,
) -> dict[str, Array]:
    """mmdetection 2.11 `AnchorHead.loss` for RetinaNet (focal + L1, no sampling).

    Args:
      cls_scores: `[B, N, C]` logits (levels flattened, see `flatten_levels`).
      bbox_preds: `[B, N, 4]` deltas. anchors: `[N, 4]`. anchor_valid: `[B, N] bool`.
      gt_boxes `[B, G, 4]`, gt_labels `[B, G] int32`, gt_valid `[B, G] bool`.
      loss_norm_group: 0 -> one normaliser `sum_i max(pos_i, 1)` over the batch; g > 0 ->
        groups of g images normalised separately, then averaged (see the module docstring).
    Returns: {'loss_cls', 'loss_bbox'} float32 scalars (float64 in a float64 run).
    """
    t = jax.vmap(
        lambda v, b, l, gv: retina_targets(
            anchors,
            v,
            b,
            l,
            gv,
            num_classes=num_classes,
            pos_iou_thr=pos_iou_thr,
            neg_iou_thr=neg_iou_thr,
            min_pos_iou=min_pos_iou,
            target_means=target_means,
            target_stds=target_stds,
        )
    )(anchor_valid, gt_boxes, gt_labels, gt_valid)
    dt = dtypes.float_dtype(cls_scores, bbox_preds, gt_boxes)
    weight = (t["pos"] | t["neg"]).astype(dt)
    # background label num_classes -> an all-zero target row (memory-lean sum, issue 24)
    cls_per_img = loss_ops.sigmoid_focal_loss_sum(
        cls_scores, t["labels"], weight, gamma=focal_gamma, alpha=focal_alpha
    )
    l1 = jnp.abs(bbox_preds.astype(dt) - t["bbox_targets"])
    bbox_per_img = jnp.sum(l1 * t["pos"][..., None].astype(dt), axis=(1, 2))
    norm_per_img = jnp.maximum(jnp.sum(t["pos"], axis=1), 1).astype(dt)
    return dict(
        loss_cls=loss_cls_weight
        * group_mean(cls_per_img, norm_per_img, loss_norm_group, who="retina_loss"),
        loss_bbox=loss_bbox_weight
        * group_mean(bbox_per_img, norm_per_img, loss_norm_group, who="retina_loss"),
    )


# ------------------------------------------------------------------------------- inference
def retina_postprocess(
    cls_scores: Sequence[Array],
    bbox_preds: Sequence[Array],
    anchors: Sequence[Array],
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    target_means: Sequence[float] = _HEAD.target_means,
    target_stds: Sequence[float] = _HEAD.target_stds,
    wh_ratio_clip: float = _HEAD.wh_ratio_clip,
    nms_pre: int = _TEST.nms_pre,
    score_thr: float = _TEST.score_thr,
    iou_threshold: float = _TEST.iou_threshold,
    max_per_img: int = _TEST.max_per_img,
    max_candidates: int = _TEST.max_candidates,
) -> dict[str, Array]:
    """mmdetection 2.11 `AnchorHead._get_bboxes` (rescale=True) + `multiclass_nms`, static.

    Args:
      cls_scores / bbox_preds: per level `[B, H, W, A*C]` logits / `[B, H, W, A*4]` deltas.
      anchors: per level `[H*W*A, 4]`. img_shape: `[B, 2]` (h, w) of the resized image.
      scale_factor: `[B, 4]` (w, h, w, h).
      nms_pre ... max_candidates: see `DenseTestCfg`.
    Returns: dict(boxes `[B, K, 4]` xyxy in original-image pixels, scores `[B, K]`,
      labels `[B, K] int32`, valid `[B, K] bool`), K = max_per_img, sorted by score.
    """
    img_shape = jnp.asarray(img_shape)
    dt = dtypes.float_dtype(*cls_scores, *bbox_preds)
    scale_factor = jnp.asarray(scale_factor, dt)
    batch = cls_scores[0].shape[0]
    all_boxes, all_scores = [], []
    for cls, reg, anc in zip(cls_scores, bbox_preds, anchors, strict=True):
        scores = jax.nn.sigmoid(cls.reshape(batch, -1, num_classes).astype(dt))
        deltas = reg.reshape(batch, -1, 4).astype(dt)
        anc = jnp.broadcast_to(anc[None], (batch, *anc.shape))
        if 0 < nms_pre < scores.shape[1]:
            scores, deltas, anc = top_candidates(scores.max(-1), nms_pre, scores, deltas, anc)
        boxes = box_ops.delta_decode(
            anc, deltas, target_means, target_stds, max_shape=img_shape, wh_ratio_clip=wh_ratio_clip
        )
        all_boxes.append(boxes)
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
class RetinaNet(SingleStageDetector):
    """mmdetection 2.x `RetinaNet` implementing the detector API of docs/contracts.md.

    Build with `RetinaNet.from_config(fgd_jax.config.retinanet_model(...))` or by hand. The
    model config's groups are its parts: `backbone`, `neck`, `head` (-> `bbox_head`, a
    `RetinaHead`, with `num_classes`), `train_cfg` (`RetinaTrainCfg`), `test_cfg`
    (`DenseTestCfg`); their defaults are those classes' field defaults.
    """

    backbone: nn.Module
    neck: nn.Module
    bbox_head: RetinaHead
    train_cfg: RetinaTrainCfg = RetinaTrainCfg()
    test_cfg: DenseTestCfg = DenseTestCfg()

    KIND = "retinanet"
    HEAD = RetinaHead
    TRAIN_CFG = RetinaTrainCfg
    TEST_CFG = DenseTestCfg

    @property
    def num_anchors(self) -> int:
        return self.bbox_head.anchors_per_cell

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features, cls_scores, bbox_preds), see docs/contracts.md."""
        feats = self.extract_feat(images, train=train)
        cls_scores, bbox_preds = self.bbox_head(feats)
        return dict(features=feats, cls_scores=cls_scores, bbox_preds=bbox_preds)

    def anchors(self, feat_shapes: Sequence[tuple[int, int]]) -> list[Array]:
        """Anchors per level for the given feature shapes (no parameters needed)."""
        head = self.bbox_head
        return retina_anchors(
            feat_shapes,
            strides=head.strides,
            octave_base_scale=head.octave_base_scale,
            scales_per_octave=head.scales_per_octave,
            ratios=head.ratios,
        )

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch dict."""
        self.check_batch(batch)
        head, tc = self.bbox_head, self.train_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        anchors = jnp.concatenate(self.anchors(shapes), axis=0)
        valid = anchor_valid_flags(
            shapes, head.strides, self.num_anchors, batch["img_shape"], tc.size_divisor
        )
        return retina_loss(
            flatten_levels(outs["cls_scores"], head.num_classes),
            flatten_levels(outs["bbox_preds"], 4),
            anchors,
            valid,
            batch["boxes"],
            batch["labels"],
            batch["valid"],
            num_classes=head.num_classes,
            pos_iou_thr=tc.pos_iou_thr,
            neg_iou_thr=tc.neg_iou_thr,
            min_pos_iou=tc.min_pos_iou,
            target_means=head.target_means,
            target_stds=head.target_stds,
            focal_gamma=head.focal_gamma,
            focal_alpha=head.focal_alpha,
            loss_cls_weight=head.loss_cls_weight,
            loss_bbox_weight=head.loss_bbox_weight,
            loss_norm_group=tc.loss_norm_group,
        )

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`retina_postprocess` with this model's settings on `__call__` outputs."""
        head, tc = self.bbox_head, self.test_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        return retina_postprocess(
            outs["cls_scores"],
            outs["bbox_preds"],
            self.anchors(shapes),
            img_shape,
            scale_factor,
            num_classes=head.num_classes,
            target_means=head.target_means,
            target_stds=head.target_stds,
            wh_ratio_clip=head.wh_ratio_clip,
            nms_pre=tc.nms_pre,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
            max_candidates=tc.max_candidates,
        )

"""YOLOX with mmdetection 2.x semantics (mmdet 2.19-2.28 `YOLOX`, `YOLOXHead`,
`SimOTAAssigner`), NHWC, Flax Linen, static shapes under jit.

Pieces (parameter names as mmdetection's; the generic converter rule maps them, e.g.
`bbox_head.multi_level_cls_convs.0.1.conv.weight` -> `bbox_head/multi_level_cls_convs_0_1/
conv/kernel`):
- `backbone`: `CSPDarknet` (`fgd_jax.models.csp_darknet`), C3..C5 at strides 8 / 16 / 32.
- `neck`: `YOLOXPAFPN` (`fgd_jax.models.yolox_pafpn`), `out_channels` per level.
- `bbox_head`: `YOLOXHead`, separate weights per level: `multi_level_cls_convs_{l}_{i}` and
  `multi_level_reg_convs_{l}_{i}` (`stacked_convs` 3x3 ConvBNAct each), 1x1
  `multi_level_conv_cls_{l}` (C), `multi_level_conv_reg_{l}` (4) and `multi_level_conv_obj_{l}`
  (1), the last two on the reg branch. mmdet's head has no per-level stem: the neck's
  `out_convs` play that part (the Megvii original's `stems`). Init: convs as PyTorch's default
  (mmdet's Kaiming a=sqrt(5) uniform), biases 0, cls and obj biases `-log((1-0.01)/0.01)`.
- Priors: `(x * stride, y * stride, stride, stride)` (mmdet `MlvlPointGenerator(offset=0)`),
  index `y * W + x` per level, levels finest first. Decoding: centre `reg[:2] * stride + prior`,
  size `exp(reg[2:]) * stride`.

Training (`yolox_loss`, mmdet 2.x `YOLOXHead.loss`): SimOTA (`fgd_jax.ops.simota`) on the
detached `sigmoid(cls) * sigmoid(obj)` and decoded boxes, with the prior centres shifted by
half a stride for the assignment only. Per image the positives' class targets are
`onehot(label) * IoU(pred, assigned GT)`; `loss_cls` = BCE-with-logits summed over positives
and classes, `loss_obj` = BCE summed over every prior (target 1 on positives), `loss_bbox` =
5 * sum over positives of `1 - IoU^2` (IoU clamped at 1e-16), `loss_l1` (only with
`train_cfg.use_l1`, or at run time with the batch's `use_l1` key: mmdet's last-15-epochs
switch, which the YOLOX data recipe sets) = L1 between the raw `reg` and
`((gt_c - prior) / stride, log(gt_wh / stride + 1e-8))`; each divided by
`max(num_pos, 1)`.
Normalisation across devices: mmdet divides each GPU's sums by `max(reduce_mean(num_pos), 1)`
and DDP averages the gradients, i.e. the global sums over the global count; that is what the
global batch here gives (only the floor differs: 1 here, 1 / num_gpus per GPU there, both
only without any positive). Every canvas point is a prior (mmdet pads YOLOX images to a
square, so its batch has no padding points either).

BatchNorm: YOLOX trains every BN (backbone, neck, head; momentum 0.03, eps 1e-3) on batch
statistics; `backbone.norm_eval=True` puts all of them on running statistics (mmdet would
apply it to the backbone only; no YOLOX config sets it). With `train=True` and
`norm_eval=False` pass `mutable=['batch_stats']` (the trainer does, `Experiment.
updates_batch_stats`); under jit over the mesh the statistics are the global batch's
(mmdet's YOLOX syncs BN).

Inference (`yolox_postprocess`, mmdet 2.x `YOLOXHead.get_bboxes` + `_bboxes_nms`): per prior
the best class `c = argmax sigmoid(cls)` with score `sigmoid(cls_c) * sigmoid(obj)`; priors
with score >= `score_thr` (0.01) are candidates, boxes decoded (no clipping) and divided by
`scale_factor`; class-wise NMS at 0.65 (mmcv `batched_nms`). mmdet keeps every detection
NMS leaves; static shapes need a cap, `test_cfg.max_per_img` (1000 by default): COCO's
metric reads only the 100 best per image, so any cap >= 100 gives the same mAP, and 1000
keeps the list as mmdet's for images with fewer survivors (the NMS stops after the cap).

Input: mmdetection's YOLOX configs feed raw BGR pixels 0..255 (no `Normalize`), padded with
114; the data settings for that are the training recipe's (not in this file).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.linen.dtypes import promote_dtype

from fgd_jax.models.build import build_module, check_keys
from fgd_jax.models.csp_darknet import (
    ConvBNAct,
    CSPDarknet,
    build_csp_darknet,
    torch_default_conv_init,
)
from fgd_jax.models.dense_heads import flatten_levels
from fgd_jax.models.yolox_pafpn import YOLOXPAFPN, build_yolox_pafpn
from fgd_jax.ops import dtypes, simota
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import nms as nms_ops

Array = jax.Array

DEFAULT_STRIDES = (8, 16, 32)


class Conv1x1(nn.Module):
    """A 1x1 conv with bias (`kernel [1, 1, Cin, Cout]`, `bias [Cout]`) as a matmul; the
    bias starts at `bias_value`."""

    features: int
    bias_value: float = 0.0
    dtype: Any = None
    kernel_init: Callable = torch_default_conv_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param(
            "bias", nn.initializers.constant(self.bias_value), (self.features,), jnp.float32
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0]) + bias


def _f32(x: Array) -> Array:
    """Head outputs in float32 (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class YOLOXHead(nn.Module):
    """mmdetection 2.x `YOLOXHead` layers (module docstring). `feats`: NHWC maps with
    `in_channels` channels, one per stride -> (cls_scores `[B, H, W, C]`, bbox_preds
    `[B, H, W, 4]` raw (dx, dy, log w, log h) in stride units, objectnesses `[B, H, W, 1]`)
    per level, float32 logits."""

    num_classes: int = 80
    in_channels: int = 256
    feat_channels: int = 256
    stacked_convs: int = 2
    strides: Sequence[int] = DEFAULT_STRIDES
    prior_prob: float = 0.01
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 5.0
    loss_obj_weight: float = 1.0
    loss_l1_weight: float = 1.0
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(
        self, feats: Sequence[Array], train: bool = False
    ) -> tuple[list[Array], list[Array], list[Array]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"YOLOXHead: {len(feats)} maps for strides {tuple(self.strides)}")
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        cls_out, reg_out, obj_out = [], [], []
        for lvl, x in enumerate(feats):
            cls_feat, reg_feat = x, x
            for i in range(self.stacked_convs):
                cls_feat = ConvBNAct(
                    self.feat_channels,
                    3,
                    1,
                    self.bn_train,
                    self.dtype,
                    name=f"multi_level_cls_convs_{lvl}_{i}",
                )(cls_feat, train)
                reg_feat = ConvBNAct(
                    self.feat_channels,
                    3,
                    1,
                    self.bn_train,
                    self.dtype,
                    name=f"multi_level_reg_convs_{lvl}_{i}",
                )(reg_feat, train)
            cls_out.append(
                _f32(
                    Conv1x1(self.num_classes, bias, self.dtype, name=f"multi_level_conv_cls_{lvl}")(
                        cls_feat
                    )
                )
            )
            reg_out.append(
                _f32(Conv1x1(4, 0.0, self.dtype, name=f"multi_level_conv_reg_{lvl}")(reg_feat))
            )
            obj_out.append(
                _f32(Conv1x1(1, bias, self.dtype, name=f"multi_level_conv_obj_{lvl}")(reg_feat))
            )
        return cls_out, reg_out, obj_out


@dataclasses.dataclass(frozen=True)
class YOLOXTrainCfg:
    """mmdet `train_cfg.assigner` (`SimOTAAssigner`) and the head's `use_l1` switch (off; the
    recipe turns it on for the last 15 epochs, mmdet's `YOLOXModeSwitchHook`)."""

    center_radius: float = 2.5
    candidate_topk: int = 10
    iou_weight: float = 3.0
    cls_weight: float = 1.0
    use_l1: bool = False


@dataclasses.dataclass(frozen=True)
class YOLOXTestCfg:
    """mmdet YOLOX `test_cfg`: score_thr (a prior is kept when `max_c score >= score_thr`),
    class-wise NMS `iou_threshold`; `max_per_img`: the static cap on detections (mmdet has
    none; see the module docstring)."""

    score_thr: float = 0.01
    iou_threshold: float = 0.65
    max_per_img: int = 1000


# --------------------------------------------------------------------------- priors / boxes
def yolox_priors(feat_shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> Array:
    """`[N, 4]` float32 (x, y, stride, stride): mmdet `MlvlPointGenerator(offset=0)
    .grid_priors(with_stride=True)`, levels concatenated finest first, index `y * W + x`."""
    out = []
    for (h, w), s in zip(feat_shapes, strides, strict=True):
        xs = jnp.arange(w, dtype=jnp.float32) * s
        ys = jnp.arange(h, dtype=jnp.float32) * s
        xy = jnp.stack([jnp.tile(xs, h), jnp.repeat(ys, w)], -1)
        out.append(jnp.concatenate([xy, jnp.full((h * w, 2), float(s), jnp.float32)], -1))
    return jnp.concatenate(out, 0)


def yolox_decode(priors: Array, bbox_preds: Array) -> Array:
    """mmdet `YOLOXHead._bbox_decode`: priors `[N, 4]`, bbox_preds `[..., N, 4]` -> xyxy."""
    xy = bbox_preds[..., :2] * priors[:, 2:] + priors[:, :2]
    wh = jnp.exp(bbox_preds[..., 2:]) * priors[:, 2:]
    return jnp.concatenate([xy - wh / 2, xy + wh / 2], -1)


def yolox_l1_target(gt_boxes: Array, priors: Array, eps: float = 1e-8) -> Array:
    """mmdet `YOLOXHead._get_l1_target`: `[..., 4]` GT xyxy and priors -> (dx, dy, log w,
    log h) in stride units."""
    c = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    wh = gt_boxes[..., 2:] - gt_boxes[..., :2]
    return jnp.concatenate(
        [(c - priors[..., :2]) / priors[..., 2:], jnp.log(wh / priors[..., 2:] + eps)], -1
    )


# ---------------------------------------------------------------------------------- targets
def yolox_targets(
    cls_scores: Array,
    bbox_preds: Array,
    objectness: Array,
    priors: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    train_cfg: YOLOXTrainCfg = YOLOXTrainCfg(),
) -> tuple[Array, Array]:
    """SimOTA for a batch (no gradient). Args: cls_scores `[B, N, C]` logits, bbox_preds
    `[B, N, 4]`, objectness `[B, N]` logits, priors `[N, 4]`, gt_boxes `[B, G, 4]`,
    gt_labels `[B, G]`, gt_valid `[B, G]`. Returns assigned `[B, N]` int32 (GT index or -1),
    matched_iou `[B, N]`."""
    cls_scores, bbox_preds, objectness = jax.lax.stop_gradient((cls_scores, bbox_preds, objectness))
    scores = jax.nn.sigmoid(cls_scores) * jax.nn.sigmoid(objectness)[..., None]
    decoded = yolox_decode(priors, bbox_preds)
    offset_priors = jnp.concatenate([priors[:, :2] + priors[:, 2:] * 0.5, priors[:, 2:]], -1)

    def one(s, d, gb, gl, gv):
        return simota.simota_assign(
            s,
            offset_priors,
            d,
            gb,
            gl,
            gv,
            center_radius=train_cfg.center_radius,
            candidate_topk=train_cfg.candidate_topk,
            iou_weight=train_cfg.iou_weight,
            cls_weight=train_cfg.cls_weight,
        )

    return jax.vmap(one)(scores, decoded, gt_boxes, gt_labels, gt_valid)


def yolox_loss(
    cls_scores: Array,
    bbox_preds: Array,
    objectness: Array,
    priors: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    train_cfg: YOLOXTrainCfg = YOLOXTrainCfg(),
    loss_cls_weight: float = 1.0,
    loss_bbox_weight: float = 5.0,
    loss_obj_weight: float = 1.0,
    loss_l1_weight: float = 1.0,
    l1_on: Array | None = None,
) -> dict[str, Array]:
    """mmdet 2.x `YOLOXHead.loss` on flattened outputs (shapes as `yolox_targets`).

    `l1_on`: optional runtime switch of the L1 term (a bool / 0-1 scalar, traced: the data
    pipeline's `use_l1` batch key, mmdet's `YOLOXModeSwitchHook` without a recompile);
    `loss_l1` is then computed and multiplied by it (0 before the switch).
    Returns {'loss_cls', 'loss_bbox', 'loss_obj'} (+ 'loss_l1' with `train_cfg.use_l1` or
    `l1_on`), float32 scalars, each summed over the batch and divided by `max(num_pos, 1)`."""
    dt = dtypes.float_dtype(cls_scores, bbox_preds, objectness)
    cls_scores = jnp.asarray(cls_scores, dt)
    bbox_preds = jnp.asarray(bbox_preds, dt)
    objectness = jnp.asarray(objectness, dt)
    priors = jnp.asarray(priors, dt)
    gt_boxes = jnp.asarray(gt_boxes, dt)
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    gt_valid = jnp.asarray(gt_valid, bool)
    num_classes = cls_scores.shape[-1]
    assigned, matched_iou = yolox_targets(
        cls_scores, bbox_preds, objectness, priors, gt_boxes, gt_labels, gt_valid, train_cfg
    )
    pos = assigned >= 0  # [B, N]
    safe = jnp.maximum(assigned, 0)
    tgt_boxes = jnp.take_along_axis(gt_boxes, safe[..., None], axis=1)  # [B, N, 4]
    tgt_labels = jnp.take_along_axis(gt_labels, safe, axis=1)
    num_total = jnp.maximum(jnp.sum(pos).astype(dt), 1.0)
    cls_target = jax.nn.one_hot(tgt_labels, num_classes, dtype=dt) * matched_iou[..., None]
    cls_l = loss_ops.binary_cross_entropy_with_logits(cls_scores, cls_target).sum(-1)
    loss_cls = jnp.sum(jnp.where(pos, cls_l, 0.0)) / num_total
    loss_obj = (
        jnp.sum(loss_ops.binary_cross_entropy_with_logits(objectness, pos.astype(dt))) / num_total
    )
    decoded = yolox_decode(priors, bbox_preds)
    box_l = loss_ops.iou_loss(decoded, tgt_boxes, mode="square", eps=1e-16)
    loss_bbox = jnp.sum(jnp.where(pos, box_l, 0.0)) / num_total
    out = dict(
        loss_cls=loss_cls_weight * loss_cls,
        loss_bbox=loss_bbox_weight * loss_bbox,
        loss_obj=loss_obj_weight * loss_obj,
    )
    if train_cfg.use_l1 or l1_on is not None:
        l1_t = yolox_l1_target(tgt_boxes, priors[None])
        l1 = loss_ops.l1_loss(bbox_preds, jax.lax.stop_gradient(l1_t)).sum(-1)
        loss_l1 = loss_l1_weight * jnp.sum(jnp.where(pos, l1, 0.0)) / num_total
        if not train_cfg.use_l1:
            loss_l1 = loss_l1 * jnp.asarray(l1_on).astype(dt)
        out["loss_l1"] = loss_l1
    return out


# -------------------------------------------------------------------------------- inference
def yolox_postprocess(
    cls_scores: Array,
    bbox_preds: Array,
    objectness: Array,
    priors: Array,
    scale_factor: Array,
    score_thr: float = 0.01,
    iou_threshold: float = 0.65,
    max_per_img: int = 1000,
) -> dict[str, Array]:
    """mmdet 2.x `YOLOXHead.get_bboxes(rescale=True)` (module docstring), static shapes.

    Args: flattened cls_scores `[B, N, C]`, bbox_preds `[B, N, 4]`, objectness `[B, N]`
      logits; priors `[N, 4]`; scale_factor `[B, 4]` (w, h, w, h).
    Returns dict(boxes `[B, K, 4]` xyxy in original-image pixels, scores `[B, K]`, labels
      `[B, K]` int32 (-1 where invalid), valid `[B, K]` bool), K = max_per_img, by score.
    """
    dt = dtypes.float_dtype(cls_scores, bbox_preds, objectness)
    probs = jax.nn.sigmoid(jnp.asarray(cls_scores, dt))
    max_s = probs.max(-1)
    labels = jnp.argmax(probs, -1).astype(jnp.int32)
    scores = max_s * jax.nn.sigmoid(jnp.asarray(objectness, dt))
    boxes = yolox_decode(jnp.asarray(priors, dt), jnp.asarray(bbox_preds, dt))
    boxes = boxes / jnp.asarray(scale_factor, dt)[:, None, :]
    valid = scores >= score_thr

    def one(b, s, lab, v):
        keep, kv = nms_ops.batched_nms(b, s, lab, v, iou_threshold, max_per_img)
        kv = kv & v[keep]
        return dict(
            boxes=jnp.where(kv[:, None], b[keep], 0.0),
            scores=jnp.where(kv, s[keep], 0.0),
            labels=jnp.where(kv, lab[keep], -1),
            valid=kv,
        )

    return jax.vmap(one)(boxes, scores, labels, valid)


# -------------------------------------------------------------------------------- detector
class YOLOX(nn.Module):
    """mmdetection 2.x `YOLOX` implementing the detector API of docs/contracts.md.

    Build with `YOLOX.from_config(fgd_jax.config.yolox_model(...))`. The model config's
    groups: `backbone` (`CSPDarknet`), `neck` (`YOLOXPAFPN`), `head` (-> `bbox_head`, a
    `YOLOXHead`, with `num_classes`), `train_cfg` (`YOLOXTrainCfg`), `test_cfg`
    (`YOLOXTestCfg`).
    """

    backbone: CSPDarknet
    neck: YOLOXPAFPN
    bbox_head: YOLOXHead
    train_cfg: YOLOXTrainCfg = YOLOXTrainCfg()
    test_cfg: YOLOXTestCfg = YOLOXTestCfg()

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> YOLOX:
        """Build from `fgd_jax.config.yolox_model(...)`; `dtype` is the compute dtype."""
        for key in ("backbone", "neck", "head", "num_classes"):
            if key not in model_cfg:
                raise ValueError(f"yolox model config: missing key {key!r}")
        check_keys(cls, model_cfg, allowed=("type", "num_classes", "head"))
        backbone = build_csp_darknet(model_cfg.backbone, dtype=dtype)
        bn_train = not backbone.norm_eval
        neck = build_yolox_pafpn(model_cfg.neck, dtype=dtype, bn_train=bn_train)
        head = build_module(
            YOLOXHead,
            model_cfg.head,
            "head",
            num_classes=model_cfg.num_classes,
            bn_train=bn_train,
            dtype=dtype,
        )
        if len(neck.in_channels) != len(backbone.out_indices):
            raise ValueError(
                f"yolox model config: neck.in_channels {tuple(neck.in_channels)} vs backbone "
                f"out_indices {tuple(backbone.out_indices)}"
            )
        if len(head.strides) != len(neck.in_channels) or head.in_channels != neck.out_channels:
            raise ValueError(
                "yolox model config: head.strides / head.in_channels do not match the neck "
                f"({tuple(head.strides)}, {head.in_channels} vs {len(neck.in_channels)} levels, "
                f"{neck.out_channels} channels)"
            )
        return cls(
            backbone=backbone,
            neck=neck,
            bbox_head=head,
            train_cfg=build_module(YOLOXTrainCfg, model_cfg.get("train_cfg"), "train_cfg"),
            test_cfg=build_module(YOLOXTestCfg, model_cfg.get("test_cfg"), "test_cfg"),
        )

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def strides(self) -> Sequence[int]:
        return self.bbox_head.strides

    def extract_feat(
        self, images: Array, train: bool = False, img_shape: Array | None = None
    ) -> tuple[Array, ...]:
        """`[B, H, W, 3]` (H, W multiples of 32) -> the neck's maps (strides 8, 16, 32),
        NHWC, finest first. `img_shape` is accepted for the API and unused."""
        del img_shape
        return tuple(self.neck(self.backbone(images, train=train), train=train))

    def __call__(
        self, images: Array, train: bool = False, img_shape: Array | None = None
    ) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features, cls_scores `[B, H_l, W_l, C]`, bbox_preds
        `[B, H_l, W_l, 4]`, objectnesses `[B, H_l, W_l, 1]`) per level."""
        feats = self.extract_feat(images, train=train, img_shape=img_shape)
        cls_scores, bbox_preds, objectnesses = self.bbox_head(feats, train=train)
        return dict(
            features=feats,
            cls_scores=cls_scores,
            bbox_preds=bbox_preds,
            objectnesses=objectnesses,
        )

    def priors(self, feat_shapes: Sequence[tuple[int, int]]) -> Array:
        """`yolox_priors` for the given feature shapes (no parameters needed)."""
        return yolox_priors(feat_shapes, self.strides)

    def _flat(self, outs: dict[str, Any]) -> tuple[Array, Array, Array, Array]:
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        return (
            flatten_levels(outs["cls_scores"], self.num_classes),
            flatten_levels(outs["bbox_preds"], 4),
            flatten_levels(outs["objectnesses"], 1)[..., 0],
            self.priors(shapes),
        )

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch dict; an
        optional `use_l1` [B] bool key (the YOLOX data recipe's mode switch, every row the
        same: row 0 is read) turns the L1 term on at run time (`yolox_loss(l1_on=...)`)."""
        for key in ("boxes", "labels", "valid"):
            if key not in batch:
                raise KeyError(f"YOLOX.forward_train: batch has no {key!r} (see contracts)")
        head = self.bbox_head
        cls, reg, obj, priors = self._flat(outs)
        return yolox_loss(
            cls,
            reg,
            obj,
            priors,
            batch["boxes"],
            batch["labels"],
            batch["valid"],
            self.train_cfg,
            loss_cls_weight=head.loss_cls_weight,
            loss_bbox_weight=head.loss_bbox_weight,
            loss_obj_weight=head.loss_obj_weight,
            loss_l1_weight=head.loss_l1_weight,
            l1_on=jnp.asarray(batch["use_l1"]).reshape(-1)[0] if "use_l1" in batch else None,
        )

    def forward_train(
        self, batch: dict[str, Array], train: bool = True
    ) -> tuple[dict[str, Array], tuple[Array, ...]]:
        """Batch dict (docs/contracts.md) -> ({'loss_cls', 'loss_bbox', 'loss_obj'[,
        'loss_l1']}, neck features)."""
        if "image" not in batch:
            raise KeyError("YOLOX.forward_train: batch has no 'image' (see contracts)")
        outs = self(batch["image"], train=train)
        return self.loss(outs, batch), outs["features"]

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Detections in ORIGINAL image pixels: dict(boxes [B,K,4], scores [B,K],
        labels [B,K] int32, valid [B,K] bool), K = test_cfg.max_per_img."""
        outs = self(images, train=False, img_shape=img_shape)
        return self.postprocess(outs, img_shape, scale_factor)

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`yolox_postprocess` with this model's settings on `__call__` outputs (`img_shape`
        unused: YOLOX does not clip boxes)."""
        del img_shape
        tc = self.test_cfg
        cls, reg, obj, priors = self._flat(outs)
        return yolox_postprocess(
            cls,
            reg,
            obj,
            priors,
            scale_factor,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
        )

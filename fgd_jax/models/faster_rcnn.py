"""Faster R-CNN (mmdetection 2.x / 2.11 `faster_rcnn_r50_fpn`), NHWC, Flax Linen, static shapes.

Parts (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (ResNet, C2..C5) -> `neck` (FPN, start_level 0, P2..P6, P6 = max-pool k1 s2 of P5).
- `rpn_head` (`fgd_jax.models.rpn.RPNHead`): anchors, targets, loss and proposals in
  `fgd_jax.models.rpn`.
- `roi_head` (`fgd_jax.models.roi_head.StandardRoIHead` holding a `Shared2FCBBoxHead`): RoI
  features, targets, loss and detections in `fgd_jax.models.roi_head`.
- Training (`forward_train`): RPN losses on sampled anchors, proposals with the training
  settings, RoI losses on sampled proposals (+ GT). Sampling draws from the `'sampler'` rng
  stream. Inference (`predict`): proposals with the test settings, RoI head, `rcnn_postprocess`.

Loss normalisation over devices follows `fgd_jax.models.retinanet` (`loss_norm_group`: 0 = one
normaliser for the global batch; g = groups of g images, each normalised by its own counts as
one mmdetection GPU with `samples_per_gpu=g`, then averaged).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.models.build import build_module, check_keys, config_fields
from fgd_jax.models.dense_heads import anchor_valid_flags
from fgd_jax.models.roi_head import (
    RCNN_STDS,
    RCNNTestCfg,
    RCNNTrainCfg,
    Shared2FCBBoxHead,
    StandardRoIHead,
    extract_roi_feats,
    rcnn_loss,
    rcnn_postprocess,
    rcnn_targets,
)
from fgd_jax.models.rpn import (
    RPN_STDS,
    ZERO_MEANS,
    RPNHead,
    RPNProposalCfg,
    RPNTestCfg,
    RPNTrainCfg,
    rpn_anchors,
    rpn_batch_targets,
    rpn_loss,
    rpn_proposals,
    rpn_targets,
)
from fgd_jax.ops.dtypes import float_dtype
from fgd_jax.ops.sampling import sample_assigned

Array = jax.Array

__all__ = [  # the parts live in rpn.py / roi_head.py; importable from here as before
    "RCNN_STDS",
    "RPN_STDS",
    "ZERO_MEANS",
    "FasterRCNN",
    "FasterRCNNTestCfg",
    "FasterRCNNTrainCfg",
    "RPNHead",
    "Shared2FCBBoxHead",
    "StandardRoIHead",
    "extract_roi_feats",
    "rcnn_loss",
    "rcnn_postprocess",
    "rcnn_targets",
    "rpn_anchors",
    "rpn_batch_targets",
    "rpn_loss",
    "rpn_proposals",
    "rpn_targets",
    "sample_assigned",
]


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class FasterRCNNTrainCfg:
    """Model config `train_cfg`: `rpn` (targets), `rpn_proposal` (proposals while training),
    `rcnn` (RoI targets), `size_divisor` (anchor valid flags, see `anchor_valid_flags`) and
    `loss_norm_group` (module docstring)."""

    rpn: RPNTrainCfg = RPNTrainCfg()
    rpn_proposal: RPNProposalCfg = RPNProposalCfg()
    rcnn: RCNNTrainCfg = RCNNTrainCfg()
    size_divisor: int = 32
    loss_norm_group: int = 0


@dataclasses.dataclass(frozen=True)
class FasterRCNNTestCfg:
    """Model config `test_cfg`: `rpn` (proposals) and `rcnn` (detections)."""

    rpn: RPNTestCfg = RPNTestCfg()
    rcnn: RCNNTestCfg = RCNNTestCfg()


# -------------------------------------------------------------------------------- detector
class FasterRCNN(nn.Module):
    """mmdetection 2.x `FasterRCNN` implementing the detector API of docs/contracts.md.

    Build with `FasterRCNN.from_config(fgd_jax.config.faster_rcnn_model(...))` or by hand. The
    model config's groups are its parts: `backbone`, `neck`, `rpn_head` (`RPNHead`),
    `roi_head` (`StandardRoIHead` fields + its `Shared2FCBBoxHead`'s, with `num_classes`),
    `train_cfg` (`FasterRCNNTrainCfg`), `test_cfg` (`FasterRCNNTestCfg`).
    """

    backbone: nn.Module
    neck: nn.Module
    rpn_head: RPNHead
    roi_head: StandardRoIHead
    train_cfg: FasterRCNNTrainCfg = FasterRCNNTrainCfg()
    test_cfg: FasterRCNNTestCfg = FasterRCNNTestCfg()

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> FasterRCNN:
        """Build from `fgd_jax.config.faster_rcnn_model(...)`; `dtype` is the compute dtype."""
        from fgd_jax.models.fpn import build_neck
        from fgd_jax.models.resnet import build_backbone

        for key in ("backbone", "neck", "rpn_head", "roi_head", "num_classes"):
            if key not in model_cfg:
                raise ValueError(f"faster_rcnn model config: missing key {key!r}")
        check_keys(cls, model_cfg, allowed=("type", "num_classes"))
        roi = model_cfg.roi_head
        box_keys = set(config_fields(Shared2FCBBoxHead))
        bbox_head = build_module(
            Shared2FCBBoxHead,
            {k: roi[k] for k in roi if k in box_keys},
            "roi_head",
            num_classes=int(model_cfg.num_classes),
            dtype=dtype,
        )
        train_cfg = build_module(FasterRCNNTrainCfg, model_cfg.get("train_cfg"), "train_cfg")
        test_cfg = build_module(FasterRCNNTestCfg, model_cfg.get("test_cfg"), "test_cfg")
        if train_cfg.rpn_proposal.iou_threshold != test_cfg.rpn.iou_threshold:
            raise ValueError("faster_rcnn model config: train and test RPN NMS thresholds differ")
        return cls(
            backbone=build_backbone(model_cfg.backbone, dtype=dtype),
            neck=build_neck(model_cfg.neck, dtype=dtype),
            rpn_head=build_module(RPNHead, model_cfg.rpn_head, "rpn_head", dtype=dtype),
            roi_head=build_module(
                StandardRoIHead,
                {k: roi[k] for k in roi if k not in box_keys},
                "roi_head",
                bbox_head=bbox_head,
            ),
            train_cfg=train_cfg,
            test_cfg=test_cfg,
        )

    @property
    def num_classes(self) -> int:
        return self.roi_head.bbox_head.num_classes

    @property
    def num_anchors(self) -> int:
        return self.rpn_head.anchors_per_cell

    # ---------------------------------------------------------------------- building blocks
    def extract_feat(self, images: Array, train: bool = False) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> FPN maps P2..P6, NHWC, finest first."""
        return tuple(self.neck(self.backbone(images, train=train)))

    def anchors(self, feat_shapes: Sequence[tuple[int, int]]) -> list[Array]:
        """RPN anchors per level for the given feature shapes."""
        head = self.rpn_head
        return rpn_anchors(
            feat_shapes,
            strides=head.anchor_strides,
            scales=head.anchor_scales,
            ratios=head.anchor_ratios,
        )

    def _anchor_valid(self, shapes: Sequence[tuple[int, int]], img_shape: Array) -> list[Array]:
        flags = anchor_valid_flags(
            shapes,
            self.rpn_head.anchor_strides,
            self.num_anchors,
            img_shape,
            self.train_cfg.size_divisor,
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
        """`rpn_proposals` with this model's train (`train=True`) or test settings (the test
        `min_bbox_size` and the one NMS threshold serve both)."""
        shapes = [tuple(c.shape[1:3]) for c in rpn_cls]
        test = self.test_cfg.rpn
        use = self.train_cfg.rpn_proposal if train else test
        return rpn_proposals(
            rpn_cls,
            rpn_reg,
            self.anchors(shapes),
            img_shape,
            nms_pre=use.nms_pre,
            max_per_img=use.max_per_img,
            iou_threshold=test.iou_threshold,
            min_bbox_size=test.min_bbox_size,
            anchor_valid=self._anchor_valid(shapes, img_shape),
        )

    def roi_feats(self, feats: Sequence[Array], rois: Array) -> Array:
        """RoIAlign features `[B, R, S, S, C]` for `rois [B, R, 4]`."""
        return self.roi_head.roi_feats(feats, rois)

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
            b, k, s = images.shape[0], self.test_cfg.rpn.max_per_img, self.roi_head.output_size
            props = dict(
                boxes=jnp.zeros((b, k, 4)), scores=jnp.zeros((b, k)), valid=jnp.zeros((b, k), bool)
            )
            roi_feats = jnp.zeros((b, k, s, s, feats[0].shape[-1]), float_dtype(feats[0]))
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
        losses, feats, _ = self._forward_train(batch, train)
        return losses, feats

    def _forward_train(
        self, batch: dict[str, Array], train: bool
    ) -> tuple[dict[str, Array], tuple[Array, ...], dict[str, Array]]:
        """`forward_train` plus the sampled RoI targets (`rcnn_targets`, batched), which
        Mask R-CNN's mask branch reuses."""
        for key in ("image", "boxes", "labels", "valid", "img_shape"):
            if key not in batch:
                raise KeyError(f"FasterRCNN.forward_train: batch has no {key!r} (see contracts)")
        tc = self.train_cfg
        img_shape = jnp.asarray(batch["img_shape"])
        gt_boxes = jnp.asarray(batch["boxes"], float_dtype(batch["boxes"]))
        gt_labels = jnp.asarray(batch["labels"], jnp.int32)
        gt_valid = jnp.asarray(batch["valid"], bool)
        key_rpn, key_rcnn = jax.random.split(self.make_rng("sampler"))

        feats = self.extract_feat(batch["image"], train=train)
        rpn_cls, rpn_reg = self.rpn_head(feats)
        batch_size = rpn_cls[0].shape[0]
        shapes = [tuple(c.shape[1:3]) for c in rpn_cls]
        anchors = jnp.concatenate(self.anchors(shapes), axis=0)
        anchor_valid = anchor_valid_flags(
            shapes, self.rpn_head.anchor_strides, self.num_anchors, img_shape, tc.size_divisor
        )
        rpn_t = rpn_batch_targets(
            anchors,
            anchor_valid,
            gt_boxes,
            gt_valid,
            key_rpn,
            pos_iou_thr=tc.rpn.pos_iou_thr,
            neg_iou_thr=tc.rpn.neg_iou_thr,
            min_pos_iou=tc.rpn.min_pos_iou,
            num=tc.rpn.num,
            pos_fraction=tc.rpn.pos_fraction,
        )
        losses = rpn_loss(
            jnp.concatenate([c.reshape(batch_size, -1) for c in rpn_cls], axis=1),
            jnp.concatenate([r.reshape(batch_size, -1, 4) for r in rpn_reg], axis=1),
            rpn_t,
            loss_norm_group=tc.loss_norm_group,
        )

        props = self.proposals(rpn_cls, rpn_reg, img_shape, train=True)
        keys = jax.random.split(key_rcnn, batch_size)
        rcnn = tc.rcnn
        targets = jax.vmap(
            lambda p, pv, b, lab, gv, k: rcnn_targets(
                p,
                pv,
                b,
                lab,
                gv,
                k,
                num_classes=self.num_classes,
                pos_iou_thr=rcnn.pos_iou_thr,
                neg_iou_thr=rcnn.neg_iou_thr,
                min_pos_iou=rcnn.min_pos_iou,
                match_low_quality=False,
                num=rcnn.num,
                pos_fraction=rcnn.pos_fraction,
                add_gt_as_proposals=rcnn.add_gt_as_proposals,
                target_means=ZERO_MEANS,
                target_stds=self.roi_head.bbox_head.target_stds,
            )
        )(props["boxes"], props["valid"], gt_boxes, gt_labels, gt_valid, keys)
        cls_score, bbox_pred = self.roi_head(self.roi_feats(feats, targets["rois"]))
        losses.update(
            rcnn_loss(
                cls_score,
                bbox_pred,
                targets,
                num_classes=self.num_classes,
                loss_norm_group=tc.loss_norm_group,
            )
        )
        return losses, feats, targets

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Detections in ORIGINAL image pixels: dict(boxes [B,K,4], scores [B,K],
        labels [B,K] int32, valid [B,K] bool), K = max_per_img."""
        outs = self._forward_test(images, jnp.asarray(img_shape))
        return self.postprocess(outs, img_shape, scale_factor)

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`rcnn_postprocess` with this model's settings on test-forward outputs."""
        tc = self.test_cfg.rcnn
        return rcnn_postprocess(
            outs["cls_score"],
            outs["bbox_pred"],
            outs["proposals"]["boxes"],
            outs["proposals"]["valid"],
            img_shape,
            scale_factor,
            num_classes=self.num_classes,
            target_means=ZERO_MEANS,
            target_stds=self.roi_head.bbox_head.target_stds,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
            max_candidates=tc.max_candidates,
        )

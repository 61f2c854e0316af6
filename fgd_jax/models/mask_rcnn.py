"""Mask R-CNN (mmdetection 2.x / 2.11 `mask_rcnn_r50_fpn`): Faster R-CNN + a mask branch.

- `MaskRoIHead`: `StandardRoIHead` plus `mask_head` (`FCNMaskHead`, parameters under
  `roi_head/mask_head/...` as mmdetection's `roi_head.mask_head.*`), RoIAlign 14x14 of the
  same levels, sampling ratio and alignment as the box branch (mmdetection's
  `mask_roi_extractor`).
- Training (`forward_train`): Faster R-CNN's losses, then the mask branch on the positive
  sampled RoIs (the first `int(num * pos_fraction)` sampled slots: the sampler puts positives
  first and never samples more), mask targets from the batch's mask grids
  (`fgd_jax.ops.masks.mask_targets`, batch keys `masks` / `mask_regions`: `data.with_mask`),
  `loss_mask` (`fgd_jax.models.mask_head.mask_loss`: mean over the positives x 28 x 28 of each
  group of `train_cfg.loss_norm_group` images, as mmdetection per GPU, averaged).
  Option (off by default): `mask_head.train_roi_buckets`, e.g. (16, 32, 64): the mask branch
  runs on the first k slots only, k the smallest bucket or the quota that holds the batch's
  largest positive count, chosen at run time by `nn.switch` (`MaskRoIHead.mask_train_loss`;
  the same loss and gradients as the full quota, tests/test_mask_rcnn_buckets.py). Each
  bucket is one more compiled copy of the mask branch (RoIAlign, head, targets, loss and
  their backward). On XLA:CPU the switched step measured slower than the full quota
  (gradients through `lax.switch` cost more than the chosen branch:
  benchmarks/results/mask_rcnn_cpu.md), hence the default () (one branch).
- Inference (`predict`): Faster R-CNN's detections, then the mask head on the detected boxes
  scaled back to the network input (mmdetection `simple_test_mask` with rescale: boxes x
  scale_factor): `mask_probs [B, K, 28, 28]`, the sigmoid of each detection's class channel.
  `paste_detections` pastes them into the original image (`_do_paste_mask`, >= 0.5) on the
  host, where each image's size is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgd_jax.models.build import build_module
from fgd_jax.models.faster_rcnn import FasterRCNN
from fgd_jax.models.mask_head import FCNMaskHead, mask_loss
from fgd_jax.models.roi_head import StandardRoIHead, extract_roi_feats
from fgd_jax.ops import masks as mask_ops
from fgd_jax.ops.dtypes import float_dtype

Array = jax.Array


class MaskRoIHead(StandardRoIHead):
    """`StandardRoIHead` with a mask branch (`mask_head`, required for Mask R-CNN)."""

    mask_head: FCNMaskHead | None = None

    def mask_feats(self, feats: Sequence[Array], rois: Array) -> Array:
        """RoIAlign features `[B, R, S, S, C]` (S = `mask_head.roi_feat_size`) of `rois`."""
        return extract_roi_feats(
            feats[: len(self.featmap_strides)],
            rois,
            strides=self.featmap_strides,
            output_size=self.mask_head.roi_feat_size,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            finest_scale=self.finest_scale,
        )

    def masks(self, mask_feats: Array) -> Array:
        """Mask logits `[..., 2S, 2S, num_classes]`."""
        return self.mask_head(mask_feats)

    def mask_train_loss(
        self,
        feats: Sequence[Array],
        rois: Array,
        pos: Array,
        gt_inds: Array,
        labels: Array,
        masks: Array,
        mask_regions: Array,
        canvas_hw: Array,
        loss_norm_group: int = 0,
    ) -> Array:
        """`loss_mask` of the positive RoIs among `P` slots per image (the sampler's positive
        quota): RoIAlign, mask head, targets (`mask_ops.mask_targets`) and `mask_loss`.

        Only the first `k` slots run, `k` the smallest of `mask_roi_buckets` holding the
        batch's largest positive count (positives put first, in their order): the loss and
        its gradients are those of all `P` slots (the others are not positive and weigh 0),
        up to float summation order. Each bucket is one `nn.switch` branch, compiled.
        Args: feats: the FPN maps `[B, H_l, W_l, C]`; rois `[B, P, 4]`, pos `[B, P]` bool,
          gt_inds `[B, P]`, labels `[B, P]` (`rcnn_targets`); masks `[B, G, M, M]` and
          mask_regions `[B, G, 4]` (the batch's); canvas_hw `[2]` padded canvas (H, W).
        Returns the scalar loss (`mask_loss`, `loss_norm_group` as there).
        """
        pos = jnp.asarray(pos, bool)
        order = jnp.argsort(~pos, axis=1, stable=True)  # the sampler's order already
        rois = jnp.take_along_axis(rois, order[..., None], axis=1)
        pos, gt_inds, labels = (
            jnp.take_along_axis(x, order, axis=1) for x in (pos, gt_inds, labels)
        )
        sizes = mask_roi_buckets(self.mask_head.train_roi_buckets, pos.shape[1])

        def branch(k: int):
            def run(head: MaskRoIHead, feats, rois, pos, gt_inds, labels, masks, regions):
                rois, pos, gt_inds, labels = (x[:, :k] for x in (rois, pos, gt_inds, labels))
                logits = head.masks(head.mask_feats(feats, rois))
                out_size = logits.shape[-2]
                mask_t = jax.vmap(
                    lambda g, r, ro, gi: mask_ops.mask_targets(
                        g, r, ro, gi, canvas_hw, out_size=out_size
                    )
                )(masks, regions, rois, gt_inds)
                return mask_loss(
                    logits,
                    jax.lax.stop_gradient(mask_t),
                    labels,
                    pos,
                    loss_norm_group=loss_norm_group,
                )

            return run

        operands = (tuple(feats), rois, pos, gt_inds, labels, masks, mask_regions)
        if len(sizes) == 1:
            return branch(sizes[0])(self, *operands)
        n = jnp.max(jnp.sum(pos, axis=1))
        index = jnp.sum(jnp.asarray(sizes[:-1]) < n)  # the first size >= n
        return nn.switch(index, [branch(k) for k in sizes], self, *operands)


def mask_roi_buckets(buckets: Sequence[int], quota: int) -> tuple[int, ...]:
    """The mask branch's slot counts per image (`FCNMaskHead.train_roi_buckets` below the
    positive `quota`, ascending, then `quota` itself)."""
    if any(int(k) <= 0 for k in buckets):
        raise ValueError(f"mask_head.train_roi_buckets must be positive, got {tuple(buckets)}")
    return tuple(sorted({int(k) for k in buckets if int(k) < quota})) + (int(quota),)


class MaskRCNN(FasterRCNN):
    """mmdetection 2.x `MaskRCNN` implementing the detector API of docs/contracts.md, with
    `mask_loss` in training and `mask_probs` in `predict` (module docstring)."""

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> MaskRCNN:
        """Build from `fgd_jax.config.mask_rcnn_model(...)`: Faster R-CNN's groups, with
        `roi_head.mask_head` (`FCNMaskHead` fields but `num_classes`)."""
        cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        if "mask_head" not in cfg.roi_head:
            raise ValueError("mask_rcnn model config: missing roi_head.mask_head")
        mask_cfg = cfg.roi_head.mask_head
        del cfg.roi_head["mask_head"]
        base = super().from_config(cfg, dtype=dtype)
        mask_head = build_module(
            FCNMaskHead,
            mask_cfg,
            "roi_head/mask_head",
            num_classes=int(model_cfg.num_classes),
            dtype=dtype,
        )
        roi = base.roi_head
        fields = {
            f.name: getattr(roi, f.name)
            for f in dataclasses.fields(StandardRoIHead)
            if f.name not in ("parent", "name")
        }
        fields["bbox_head"] = roi.bbox_head.clone()
        return base.clone(roi_head=MaskRoIHead(**fields, mask_head=mask_head))

    @property
    def max_mask_rois(self) -> int:
        """Positive RoIs per image the mask branch sees: the sampler's positive quota."""
        rcnn = self.train_cfg.rcnn
        return int(rcnn.num * rcnn.pos_fraction)

    def _forward_test(self, images: Array, img_shape: Array) -> dict[str, Any]:
        outs = super()._forward_test(images, img_shape)
        if self.is_initializing():  # create the mask head's parameters
            s, c = self.roi_head.mask_head.roi_feat_size, outs["features"][0].shape[-1]
            self.roi_head.masks(jnp.zeros((1, 1, s, s, c), float_dtype(outs["features"][0])))
        return outs

    def forward_train(
        self, batch: dict[str, Array], train: bool = True
    ) -> tuple[dict[str, Array], tuple[Array, ...]]:
        """Faster R-CNN's losses plus `loss_mask`; the batch needs `masks` and
        `mask_regions` (`data.with_mask=True`)."""
        for key in ("masks", "mask_regions"):
            if key not in batch:
                raise KeyError(
                    f"MaskRCNN.forward_train: batch has no {key!r}; train with "
                    "data.with_mask=True (docs/contracts.md)"
                )
        losses, feats, targets = self._forward_train(batch, train)
        p = self.max_mask_rois
        losses["loss_mask"] = self.roi_head.mask_train_loss(
            feats,
            targets["rois"][:, :p],
            targets["pos"][:, :p],
            targets["gt_inds"][:, :p],
            targets["labels"][:, :p],
            jnp.asarray(batch["masks"]),
            jnp.asarray(batch["mask_regions"]),
            jnp.asarray(batch["image"].shape[1:3], jnp.int32),
            loss_norm_group=self.train_cfg.loss_norm_group,
        )
        return losses, feats

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Faster R-CNN's detections (ORIGINAL image pixels) plus `mask_probs [B, K, 28, 28]`
        float32: the sigmoid of each detection's class channel, for its box."""
        outs = self._forward_test(images, jnp.asarray(img_shape))
        det = self.postprocess(outs, img_shape, scale_factor)
        sf = jnp.asarray(scale_factor, det["boxes"].dtype)[:, None, :]
        rois = jnp.where(det["valid"][..., None], det["boxes"] * sf, 0.0)
        logits = self.roi_head.masks(self.roi_head.mask_feats(outs["features"], rois))
        lab = jnp.clip(det["labels"], 0, self.num_classes - 1)
        cls_logit = jnp.take_along_axis(logits, lab[:, :, None, None, None], axis=-1)[..., 0]
        det["mask_probs"] = jax.nn.sigmoid(cls_logit.astype(jnp.float32))
        return det


def paste_detections(det: dict[str, Any], i: int, orig_hw: tuple[int, int]) -> np.ndarray:
    """Image `i`'s valid detections' masks `[n, h, w]` bool in its original image
    (`orig_hw`), from `MaskRCNN.predict`'s `mask_probs` and `boxes` (mmdetection
    `get_seg_masks(rescale=True)` on GPU: whole-image `_do_paste_mask`, `>= 0.5`)."""
    valid = np.asarray(det["valid"][i])
    probs = np.asarray(det["mask_probs"][i])[valid]
    boxes = np.asarray(det["boxes"][i])[valid]
    if not len(boxes):
        return np.zeros((0, *orig_hw), bool)
    return mask_ops.paste_masks_np(probs, boxes, (int(orig_hw[0]), int(orig_hw[1])))

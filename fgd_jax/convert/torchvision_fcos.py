"""torchvision `fcos_resnet50_fpn` -> our FCOS (mmdetection names), and the model config that
reproduces torchvision's numbers.

Head layout in torchvision (`FCOSHead`): `head.classification_head.conv` and
`head.regression_head.conv` are `Sequential(conv, GroupNorm(32), ReLU) x 4`, so module `3*i` is
tower conv `i` and `3*i + 1` its GroupNorm; `cls_logits`, `bbox_reg`, `bbox_ctrness` are the
predictors. Backbone (`backbone.body`) and FPN (`backbone.fpn`, P6/P7 from P5) use the shared
rules of `fgd_jax.convert.torchvision_backbone`.

Where torchvision's FCOS differs from mmdetection's, `torchvision_fcos_config` sets our model
to torchvision's behaviour:
- pytorch-style ResNet-50 (stride on the 3x3), RGB input with ImageNet mean/std (data
  `pixel_style='pytorch'`); mmdetection's FCOS uses caffe style and BGR.
- no learnable per-level `Scale` (`head.use_scale=False`, so the converted tree has no
  `scales_*`); regression `relu(bbox_reg(x))` times the anchor size (= stride), i.e.
  mmdetection's `norm_on_bbox=True` with scale 1.
- centerness on the regression tower (`centerness_on_reg=True`), bias in the tower convs.
- points at `(x * stride, y * stride)` (anchor centres), not `+ stride // 2`
  (`half_stride_offset=False`). torchvision derives strides as `image_size // feature_size`;
  they equal (8, ..., 128) only when the input size is a multiple of 128.
- postprocess `score_style='torchvision'`: score `sqrt(sigmoid(cls) * sigmoid(ctr))`,
  threshold 0.2 on it, top 1000 (point, class) pairs per level, class-wise NMS 0.6, 100 per
  image.
- training targets differ (torchvision: centre region `radius * stride` around the GT centre
  with strict range bounds `4 * stride < max distance < 8 * stride`; focal/GIoU/BCE all divided
  by the number of foreground points, GIoU unweighted); our loss stays mmdetection's.
"""

from __future__ import annotations

import ml_collections

from fgd_jax.convert.core import RenameRules

_MAX_CONVS = 16  # tower convs covered by the rules (torchvision's default is 4)


def _tower_rules(tv_branch: str, ours: str) -> list[tuple[str, str]]:
    rules = []
    for i in range(_MAX_CONVS):
        rules.append((rf"^head\.{tv_branch}\.conv\.{3 * i}\.", f"bbox_head.{ours}.{i}.conv."))
        rules.append((rf"^head\.{tv_branch}\.conv\.{3 * i + 1}\.", f"bbox_head.{ours}.{i}.gn."))
    return rules


RENAME_RULES: RenameRules = tuple(
    _tower_rules("classification_head", "cls_convs")
    + _tower_rules("regression_head", "reg_convs")
    + [
        (r"^head\.classification_head\.cls_logits\.", "bbox_head.conv_cls."),
        (r"^head\.regression_head\.bbox_reg\.", "bbox_head.conv_reg."),
        (r"^head\.regression_head\.bbox_ctrness\.", "bbox_head.conv_centerness."),
    ]
)


def torchvision_fcos_config(
    num_classes: int = 91,
    score_thr: float = 0.2,
    nms_pre: int = 1000,
    iou_threshold: float = 0.6,
    max_per_img: int = 100,
) -> ml_collections.ConfigDict:
    """Model config equal to `torchvision.models.detection.fcos_resnet50_fpn(num_classes=...)`
    (arguments: its `score_thresh`, `topk_candidates`, `nms_thresh`, `detections_per_img`)."""
    from fgd_jax import config as C

    cfg = C.fcos_model(depth=50, num_classes=num_classes, tricks=True, style="pytorch")
    cfg.head.centerness_on_reg = True
    cfg.head.use_scale = False
    cfg.head.half_stride_offset = False
    cfg.head.center_sampling = True
    cfg.test_cfg.score_style = "torchvision"
    cfg.test_cfg.score_thr = score_thr
    cfg.test_cfg.nms_pre = nms_pre
    cfg.test_cfg.iou_threshold = iou_threshold
    cfg.test_cfg.max_per_img = max_per_img
    return cfg

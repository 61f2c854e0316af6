"""A feature teacher: the backbone + FPN of any mmdetection detector, without its heads.

FGD only runs the teacher's `extract_feat` (backbone + neck), so a teacher whose heads fgd-jax
does not implement (e.g. mmdetection's `cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco`,
the paper's Faster R-CNN / Mask R-CNN teacher) is usable through this model type: model config
`type='features'` with `backbone` and `neck` groups (`fgd_jax.config.feature_teacher_model`).
The converter takes its checkpoint's `backbone.*` and `neck.*` keys strictly and drops the rest
explicitly (listed in the conversion report as `dropped`). It has no `predict`: it cannot be
evaluated, and it cannot be inherited from (`distill.init_student` must be False).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fgd_jax.models.build import check_keys

Array = jax.Array


class FeatureTeacher(nn.Module):
    """`backbone` (ResNet / ResNeXt, DCN allowed) -> `neck` (FPN). `[B, H, W, 3]` -> FPN maps,
    NHWC, finest first (what `extract_feat` of the full detector returns)."""

    backbone: nn.Module
    neck: nn.Module

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> FeatureTeacher:
        """Build from `fgd_jax.config.feature_teacher_model(...)`."""
        from fgd_jax.models.fpn import build_neck
        from fgd_jax.models.resnet import build_backbone

        for key in ("backbone", "neck"):
            if key not in model_cfg:
                raise ValueError(f"features model config: missing key {key!r}")
        check_keys(cls, model_cfg, "", allowed=("type",))
        return cls(
            backbone=build_backbone(model_cfg.backbone, dtype=dtype),
            neck=build_neck(model_cfg.neck, dtype=dtype),
        )

    def extract_feat(self, images: Array, train: bool = False) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> the FPN maps FGD distills (the `fpn_convs.{l}.conv` outputs:
        before the norm of a GN neck, the outputs otherwise), NHWC, finest first."""
        return tuple(self.neck(self.backbone(images, train=train), with_pre_norm=True)[1])

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """`[B, H, W, 3]` -> `dict(features=...)` (the detector API's first entry)."""
        return dict(features=self.extract_feat(images, train=train))

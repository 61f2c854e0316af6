"""The glue the one-stage FPN detectors share (RetinaNet, FCOS, GFL, RepPoints, SOLO).

`SingleStageDetector` is a Flax module without fields of its own: a detector subclasses it,
declares its fields (`backbone`, `neck`, the head, `train_cfg`, `test_cfg`, and any more)
and names its parts in class constants; it inherits

- `from_config(model_cfg, dtype)`: the model config's groups -> the parts (`build_parts`,
  which a detector extends for settings of its own), with the checks every one of them
  makes (missing groups, unknown keys, `neck.num_outs` == the number of head strides);
- `num_classes`, `strides`, `extract_feat` (backbone -> neck);
- `forward_train(batch)` -> (`loss(outs, batch)`, features) and `predict` -> `postprocess`,
  the detector API of docs/contracts.md, around the detector's own `__call__`, `loss` and
  `postprocess`.

Parameter paths and settings are those of the detector's fields: moving the glue here
changes no checkpoint (tests/test_model_configs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections

from fgd_jax.models.build import build_module, check_keys

Array = jax.Array

# what `loss` reads from a batch besides the image (docs/contracts.md)
LOSS_KEYS = ("boxes", "labels", "valid", "img_shape")


class SingleStageDetector(nn.Module):
    """Base of the one-stage FPN detectors: see the module docstring. Class constants a
    subclass sets: `KIND` (its `model.type`, for error messages), `HEAD`, `TRAIN_CFG`,
    `TEST_CFG` (the classes its config groups build), `HEAD_FIELD` (the detector's field that
    holds the head: `bbox_head`, SOLO's `mask_head`; it names the head's parameters),
    `STRIDES_FIELD` (the head's field with the level strides), `EXTRA_KEYS` (top-level
    model-config keys it reads itself)."""

    KIND: ClassVar[str] = ""
    HEAD: ClassVar[type]
    TRAIN_CFG: ClassVar[type]
    TEST_CFG: ClassVar[type]
    HEAD_FIELD: ClassVar[str] = "bbox_head"
    STRIDES_FIELD: ClassVar[str] = "strides"
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build_parts(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> dict:
        """The constructor's arguments from a model config: backbone, neck, the head (under
        `HEAD_FIELD`), train_cfg, test_cfg. Raises ValueError naming a missing group or
        unknown key, or a neck whose number of outputs differs from the head's strides."""
        from fgd_jax.models.fpn import build_neck
        from fgd_jax.models.resnet import build_backbone

        for key in ("backbone", "neck", "head", "num_classes"):
            if key not in model_cfg:
                raise ValueError(f"{cls.KIND} model config: missing key {key!r}")
        check_keys(cls, model_cfg, "", allowed=("type", "num_classes", "head", *cls.EXTRA_KEYS))
        head = build_module(
            cls.HEAD, model_cfg.head, "head", num_classes=model_cfg.num_classes, dtype=dtype
        )
        strides = getattr(head, cls.STRIDES_FIELD)
        if model_cfg.neck.num_outs != len(strides):
            raise ValueError(
                f"{cls.KIND} model config: neck.num_outs {model_cfg.neck.num_outs} != "
                f"{len(strides)} head.{cls.STRIDES_FIELD}"
            )
        return dict(
            backbone=build_backbone(model_cfg.backbone, dtype=dtype),
            neck=build_neck(model_cfg.neck, dtype=dtype),
            **{cls.HEAD_FIELD: head},
            train_cfg=build_module(cls.TRAIN_CFG, model_cfg.get("train_cfg"), "train_cfg"),
            test_cfg=build_module(cls.TEST_CFG, model_cfg.get("test_cfg"), "test_cfg"),
        )

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict, dtype: Any = None):
        """Build from the detector's config factory (`fgd_jax.config.<kind>_model(...)`);
        `dtype` is the compute dtype."""
        return cls(**cls.build_parts(model_cfg, dtype))

    @property
    def num_classes(self) -> int:
        return getattr(self, self.HEAD_FIELD).num_classes

    @property
    def strides(self) -> Sequence[int]:
        return getattr(getattr(self, self.HEAD_FIELD), self.STRIDES_FIELD)

    def extract_feat(self, images: Array, train: bool = False) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> the FPN maps (P3..P7; SOLO's P2..P6), NHWC, finest first."""
        return tuple(self.neck(self.backbone(images, train=train)))

    def check_batch(self, batch: Mapping[str, Any], keys: Iterable[str] = LOSS_KEYS) -> None:
        """Raise KeyError naming the first of `keys` the batch lacks."""
        for key in keys:
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__}.forward_train: batch has no {key!r} (see contracts)"
                )

    def input_kwargs(self, img_shape: Array | None) -> dict[str, Any]:
        """Extra `__call__` arguments from the batch's `img_shape` (none by default; FCOS
        bounds its input shift with it)."""
        return {}

    def forward_train(
        self, batch: dict[str, Array], train: bool = True
    ) -> tuple[dict[str, Array], tuple[Array, ...]]:
        """Batch dict (docs/contracts.md) -> (the detector's losses, the distilled features:
        `__call__`'s `features`)."""
        self.check_batch(batch, ("image",))
        outs = self(batch["image"], train=train, **self.input_kwargs(batch.get("img_shape")))
        return self.loss(outs, batch), outs["features"]

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Detections in ORIGINAL image pixels: dict(boxes [B,K,4], scores [B,K],
        labels [B,K] int32, valid [B,K] bool), K = test_cfg.max_per_img."""
        outs = self(images, train=False, **self.input_kwargs(img_shape))
        return self.postprocess(outs, img_shape, scale_factor)

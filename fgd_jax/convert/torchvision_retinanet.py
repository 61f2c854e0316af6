"""torchvision `retinanet_resnet50_fpn` head keys -> mmdetection `RetinaHead` names.

`RENAME_RULES` (first match wins) is picked up by `fgd_jax.convert.torchvision_rules` for a
model config of type 'retinanet'; the backbone and FPN rules live in `torchvision_backbone`.

- `head.classification_head.conv.{i}.0.*` -> `bbox_head.cls_convs.{i}.conv.*`
- `head.regression_head.conv.{i}.0.*` -> `bbox_head.reg_convs.{i}.conv.*`
  (before torchvision 0.13 these were `conv.{2i}.*`; both layouts are accepted)
- `head.classification_head.cls_logits.*` -> `bbox_head.retina_cls.*`
- `head.regression_head.bbox_reg.*` -> `bbox_head.retina_reg.*`

What is the same in both (so converted weights give the same head outputs):
- Class channels: torchvision views `cls_logits` `[N, A*K, H, W]` as `[N, A, K, H, W]`, i.e.
  channel `a*K + k`, and flattens to `(y, x, a)` order: mmdetection's `a*C + c`, `(y*W+x)*A+a`.
  Box channels likewise `a*4 + j`.
- Anchor order inside a cell: both generate `ratio`-major, `scale`-fastest, centred on
  `(x*stride, y*stride)`, ratios (0.5, 1, 2) as h/w.

What differs (so detections differ unless the anchors are shared):
- Anchor sizes: torchvision uses integer sizes `(x, int(x*2**(1/3)), int(x*2**(2/3)))` =
  (32, 40, 50) at P3, and rounds the base anchors to integers; mmdetection uses
  `stride * 4 * 2**(i/3)` = (32, 40.32, 50.80) unrounded.
- Strides: torchvision derives them as `image_size // feature_size` (not 8..128 when the input
  is not a multiple of 128).
- P6: torchvision's `LastLevelP6P7(256, 256)` takes P5 (FPN output) and applies ReLU before P7:
  mmdetection `add_extra_convs='on_output', relu_before_extra_convs=True` (mmdetection's own
  RetinaNet uses 'on_input', i.e. C5, and no ReLU).
- Box decoding: torchvision clamps only dw, dh from above at log(1000/16); mmdetection clamps
  both sides.
- Post-processing: torchvision keeps the top 1000 (anchor, class) pairs per level among those
  above the score threshold; mmdetection 2.11 keeps the top `nms_pre` anchors per level by their
  best class score, then thresholds every (anchor, class) pair.
"""

from __future__ import annotations

from fgd_jax.convert.core import RenameRules

_MAX_CONVS = 8  # the pre-0.13 layout (conv.{2i}) needs one rule per index


def _legacy_tower(tv_head: str, ours: str) -> list[tuple[str, str]]:
    return [
        (rf"^head\.{tv_head}\.conv\.{2 * i}\.(weight|bias)$", rf"bbox_head.{ours}.{i}.conv.\1")
        for i in range(_MAX_CONVS)
    ]


RENAME_RULES: RenameRules = (
    (r"^head\.classification_head\.conv\.(\d+)\.0\.", r"bbox_head.cls_convs.\1.conv."),
    (r"^head\.regression_head\.conv\.(\d+)\.0\.", r"bbox_head.reg_convs.\1.conv."),
    *_legacy_tower("classification_head", "cls_convs"),
    *_legacy_tower("regression_head", "reg_convs"),
    (r"^head\.classification_head\.cls_logits\.", "bbox_head.retina_cls."),
    (r"^head\.regression_head\.bbox_reg\.", "bbox_head.retina_reg."),
)

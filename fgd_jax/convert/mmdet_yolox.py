"""mmdetection YOLOX checkpoints (e.g. `yolox_l_8x8_300e_coco`) -> our YOLOX.

Parameter names follow the generic rule (`bbox_head.multi_level_cls_convs.0.1.conv.weight` ->
`bbox_head/multi_level_cls_convs_0_1/conv/kernel`), so the only rule drops the EMA copies:
mmdetection 2.x's `ExpMomentumEMAHook` registers one buffer per state-dict entry on the model,
`ema_` + the key with '.' -> '_' (`ema_backbone_stem_conv_conv_weight`), and they are saved
with it. The hook swaps the EMA values into the model's parameters before each epoch's
checkpoint and evaluation, so the plain keys hold the EMA weights (what mmdetection evaluates
and we convert) and the `ema_*` buffers the raw training weights, which are dropped.
"""

from __future__ import annotations

RENAME_RULES = ((r"^ema_", None),)

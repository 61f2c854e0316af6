"""torchvision `maskrcnn_resnet50_fpn` heads onto mmdetection names (Mask R-CNN).

Everything of Faster R-CNN (`fgd_jax.convert.torchvision_faster_rcnn`: RPN, box head, the
box predictor's row surgery) plus the mask branch:

- `roi_heads.mask_head.{i}.0.*` (torchvision >= 0.13; older: `mask_fcn{i+1}.*`) ->
  mmdetection `FCNMaskHead`'s `roi_head.mask_head.convs.{i}.conv.*`;
- `roi_heads.mask_predictor.conv5_mask.*` (ConvTranspose2d 2x2, stride 2) ->
  `roi_head.mask_head.upsample.*`;
- `roi_heads.mask_predictor.mask_fcn_logits.*` -> `roi_head.mask_head.conv_logits.*`.

`mask_fcn_logits` has one channel per class *including the background at channel 0*;
mmdetection's class-specific `conv_logits` has none for the background: `prepare_state_dict`
drops channel 0 (the background's mask is never read by either model).

Differences that no conversion can remove (see tests/test_mask_rcnn.py's torchvision parity
test and benchmarks/mask_rcnn.py): torchvision's mask RoI pooler is its `MultiScaleRoIAlign`
(14x14, `aligned=False`, `sampling_ratio=2`, level `floor(4 + log2(sqrt(wh) / 224))`;
mmdetection: aligned, adaptive sampling, `floor(log2(sqrt(wh) / 56 + 1e-6))`), and its
`paste_masks_in_image` pastes a mask by resizing it, padded by one cell, to its integer box
expanded by 30 / 28 (`F.interpolate`, bilinear, `align_corners=False`), where mmdetection's
`_do_paste_mask` samples the 28 x 28 grid at every image pixel center inside the box
(`grid_sample`, `align_corners=False`): pasted masks differ along their borders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fgd_jax.convert.core import RenameRules
from fgd_jax.convert.torchvision_faster_rcnn import RENAME_RULES as _FASTER_RCNN_RULES
from fgd_jax.convert.torchvision_faster_rcnn import _numpy
from fgd_jax.convert.torchvision_faster_rcnn import prepare_state_dict as _prepare_faster_rcnn

RENAME_RULES: RenameRules = (
    *_FASTER_RCNN_RULES,
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_head.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_head.mask_head.conv_logits."),
)

_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits."
_OLD_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(.*)$")


def prepare_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision Mask R-CNN arrays -> mmdetection's layout (see the module docstring).

    Args: a torchvision Mask R-CNN state dict (tensors or arrays; other keys pass through).
    Returns a new dict: Faster R-CNN's box-predictor surgery
      (`torchvision_faster_rcnn.prepare_state_dict`), pre-0.13 `mask_fcn{k}` keys renamed to
      the current `mask_head.{k-1}.0`, and `mask_fcn_logits.*` without the background's
      channel 0 (`[C+1, ...] -> [C, ...]`).
    Raises: ValueError when `mask_fcn_logits` and the box classifier disagree on the number
      of classes.
    """
    out = _prepare_faster_rcnn(state_dict)
    for key in list(out):
        m = _OLD_FCN.match(key)
        if m:
            out[f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"] = out.pop(key)
    cls_w = out.get("roi_heads.box_predictor.cls_score.weight")
    for leaf in ("weight", "bias"):
        key = _LOGITS + leaf
        if key not in out:
            continue
        logits = np.asarray(_numpy(out[key]))
        if cls_w is not None and logits.shape[0] != np.shape(cls_w)[0]:
            raise ValueError(
                f"torchvision mask_rcnn: {key} has {logits.shape[0]} channels, the box "
                f"classifier {np.shape(cls_w)[0]} classes (both count the background)"
            )
        out[key] = logits[1:]
    return out

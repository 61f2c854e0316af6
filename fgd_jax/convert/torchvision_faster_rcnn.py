"""torchvision `fasterrcnn_resnet50_fpn` heads onto mmdetection names (Faster R-CNN).

Backbone and FPN keys are handled by `fgd_jax.convert.torchvision_backbone`; these rules rename
the RPN and box heads. torchvision's box predictor differs in layout, not only in names, so
`prepare_state_dict` must run on the torchvision state dict before renaming:

- `cls_score` has the background at row 0; mmdetection's `fc_cls` has it LAST: rows rolled.
- `bbox_pred` has 4 rows per class including the background's; mmdetection's class-specific
  `fc_reg` has none for the background: the first 4 rows are dropped. torchvision's box coder
  weights (10, 10, 5, 5) equal mmdetection's target stds (0.1, 0.1, 0.2, 0.2) (multiplying
  by a weight == dividing by a std), so no rescaling is needed.

Differences that no conversion can remove (documented and handled in tests/test_faster_rcnn.py):
torchvision rounds its base anchors to integers (mmdetection does not), its RoI pooler uses
`aligned=False`, `sampling_ratio=2` and the level `floor(4 + log2(sqrt(wh) / 224))` (mmdetection:
aligned, adaptive sampling, `floor(log2(sqrt(wh) / 56 + 1e-6))`), it drops proposals smaller
than 1e-3 and detections smaller than 1e-2 pixels, and its transform resizes and normalizes
the images itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fgd_jax.convert.core import RenameRules

RENAME_RULES: RenameRules = (
    # `rpn.head.conv.0.0` (torchvision >= 0.13, Conv2dNormActivation) or `rpn.head.conv`.
    (r"^rpn\.head\.conv\.(?:0\.0\.)?", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.bbox_head.shared_fcs.0."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.bbox_head.shared_fcs.1."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.bbox_head.fc_cls."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.bbox_head.fc_reg."),
)

_CLS = "roi_heads.box_predictor.cls_score."
_REG = "roi_heads.box_predictor.bbox_pred."


def prepare_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision box-predictor rows -> mmdetection's layout (see the module docstring).

    Args: a torchvision Faster R-CNN state dict (tensors or arrays; other keys pass through).
    Returns a new dict with `cls_score.*` rows `[bg, c_0..c_{C-1}] -> [c_0..c_{C-1}, bg]` and
      `bbox_pred.*` rows of the background removed (`[(C+1)*4, ...] -> [C*4, ...]`).
    Raises: ValueError when the two predictor layers disagree on the number of classes.
    """
    out = dict(state_dict)
    for leaf in ("weight", "bias"):
        cls_key, reg_key = _CLS + leaf, _REG + leaf
        if cls_key not in out and reg_key not in out:
            continue
        if cls_key not in out or reg_key not in out:
            raise ValueError(f"torchvision faster_rcnn: {cls_key} and {reg_key} come together")
        cls = np.asarray(_numpy(out[cls_key]))
        reg = np.asarray(_numpy(out[reg_key]))
        if reg.shape[0] != 4 * cls.shape[0]:
            raise ValueError(
                f"torchvision faster_rcnn: {reg_key} has {reg.shape[0]} rows, expected 4 x "
                f"{cls.shape[0]} (classes incl. background) from {cls_key}"
            )
        out[cls_key] = np.concatenate([cls[1:], cls[:1]], axis=0)
        out[reg_key] = reg[4:]
    return out


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)

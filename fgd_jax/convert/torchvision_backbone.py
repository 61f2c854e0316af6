"""Rename rules from torchvision layouts onto mmdetection names (first match wins; a None
replacement drops the key).

torchvision's ResNet module names already equal mmdetection's (`conv1`, `bn1`,
`layer1.0.conv1`, `layer1.0.downsample.0/1`), so the backbone rules only move the prefix.
"""

from __future__ import annotations

from fgd_jax.convert.core import RenameRules

# torchvision classification checkpoint (e.g. resnet50-0676ba61.pth), or an open-mmlab
# ImageNet backbone checkpoint (same names): keys at the top level, `fc.*` dropped.
CLASSIFICATION_BACKBONE_RULES: RenameRules = (
    (r"^fc\.", None),
    (r"^(conv1|bn1|layer[1-4])\.", r"backbone.\1."),
)

# torchvision detection models: `backbone.body.*` is the ResNet.
DETECTION_BACKBONE_RULES: RenameRules = ((r"^backbone\.body\.", "backbone."),)


def fpn_rules(num_fpn_levels: int) -> RenameRules:
    """torchvision `FeaturePyramidNetwork` -> mmdetection `FPN`.

    `num_fpn_levels` is the number of backbone maps the FPN uses (mmdetection
    `len(in_channels) - start_level`), where the extra P6/P7 convs continue the numbering.
    Both the current (`inner_blocks.i.0.weight`) and the pre-0.13 (`inner_blocks.i.weight`)
    layouts are accepted.
    """
    n = num_fpn_levels
    return (
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"neck.lateral_convs.\1.conv."),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"neck.fpn_convs.\1.conv."),
        (r"^backbone\.fpn\.extra_blocks\.p6\.", f"neck.fpn_convs.{n}.conv."),
        (r"^backbone\.fpn\.extra_blocks\.p7\.", f"neck.fpn_convs.{n + 1}.conv."),
    )

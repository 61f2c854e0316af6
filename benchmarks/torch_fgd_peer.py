"""PyTorch peer of the fgd-jax distillation step, for `benchmarks/train_step.py`.

What the original FGD code (mmdetection 2.11) runs per iteration, built from torchvision parts:
- teacher: a RetinaNet with torchvision's `resnet_fpn_backbone('resnet101')` (frozen BN, P3-P7
  with `LastLevelP6P7`), eval mode, `torch.no_grad`, only its backbone + FPN run;
- student: torchvision's `retinanet_resnet50_fpn` layout (frozen BN, stem and layer1 frozen
  = mmdetection `frozen_stages=1`), its own focal + L1 losses;
- FGD: one `FeatureLossReference` (the original `FeatureLoss`, `benchmarks/fgd_torch_reference.py`)
  per FPN level on the 5 student / teacher maps;
- update: `torch.optim.SGD` (momentum, weight decay) after `clip_grad_norm_`.

Differences from mmdetection that change the arithmetic slightly (both sides still do the
same kind of work): torchvision builds P6 from P5 (256 channels) where mmdetection's
`add_extra_convs='on_input'` builds it from C5 (2048 channels) - about 0.5 GFLOP per 512x512
image less on the torch side -, and torchvision's anchor matching / losses are its own.
The transform (resize + normalize) is bypassed: images come in already normalized and padded,
as in fgd-jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmarks.fgd_torch_reference import FeatureLossReference


def student_retinanet_r50(num_classes: int = 80) -> RetinaNet:
    """`retinanet_resnet50_fpn` as torchvision builds it with pretrained weights (frozen BN,
    3 trainable stages), but with random weights (no download)."""
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return RetinaNet(backbone, num_classes)


def teacher_retinanet_r101(num_classes: int = 80) -> RetinaNet:
    """RetinaNet ResNet-101-FPN teacher (random weights, everything frozen, eval mode)."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet101",
        weights=None,
        trainable_layers=0,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = RetinaNet(backbone, num_classes).eval()
    model.requires_grad_(False)
    return model


class TorchFGDPeer(nn.Module):
    """Teacher + student + 5 FGD losses. `forward(images, targets, img_shapes)` -> losses.

    images: [B, 3, H, W] float32, normalized and padded; targets: list of dict(boxes [n, 4]
    xyxy pixels, labels [n] int64); img_shapes: list of (h, w) before padding.
    """

    def __init__(
        self,
        num_classes: int = 80,
        channels: int = 256,
        num_levels: int = 5,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.0005,
        lambda_fgd: float = 0.000005,
    ):
        super().__init__()
        self.student = student_retinanet_r50(num_classes)
        self.teacher = teacher_retinanet_r101(num_classes)
        self.distill_losses = nn.ModuleList(
            FeatureLossReference(
                channels, channels, temp, alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd
            )
            for _ in range(num_levels)
        )

    def train(self, mode: bool = True) -> TorchFGDPeer:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode (as the original's)
        return self

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        img_shapes: Sequence[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats_t = list(self.teacher.backbone(images).values())
        feats_s = list(self.student.backbone(images).values())
        head_outputs = self.student.head(feats_s)
        image_list = ImageList(images, [tuple(int(v) for v in s) for s in img_shapes])
        anchors = self.student.anchor_generator(image_list, feats_s)
        losses = dict(self.student.compute_loss(targets, head_outputs, anchors))
        gt = [t["boxes"] for t in targets]
        metas = [{"img_shape": (int(h), int(w), 3)} for h, w in img_shapes]
        for i, fgd in enumerate(self.distill_losses):
            losses[f"loss_fgd_fpn_{i}"] = fgd(feats_s[i], feats_t[i], gt, metas)["loss"]
        return losses


def make_sgd(
    peer: TorchFGDPeer, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.SGD:
    """SGD over the trained parameters (student's unfrozen ones + FGD), mmdetection style."""
    params = [p for p in peer.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(
    peer: TorchFGDPeer,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    img_shapes: Sequence[tuple[int, int]],
    clip_norm: float = 35.0,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One distillation step: losses, backward, clip, SGD update. Returns the total loss
    (a host float, which also synchronizes a CUDA device). `autocast_dtype=torch.bfloat16`:
    mixed precision (the forward under `torch.autocast`, float32 parameters and update)."""
    peer.train()
    opt.zero_grad(set_to_none=True)
    mixed = autocast_dtype is not None
    with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=mixed):
        losses = peer(images, targets, img_shapes)
        loss = sum(v.float() for v in losses.values())
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], max_norm=clip_norm
        )
    opt.step()
    return float(loss.detach())

"""Golden files for a whole small GFL detector (backbone + FPN + head), from real mmdetection
3.3 with 2.11's post-processing.

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_gfl_detector_golden.py

Writes `tests/golden/gfl_detector/` (read by tests/test_gfl_detector_golden.py):
- `gfl.pth`: the checkpoint as mmdetection writes it (`save_checkpoint` of `meta` +
  `model.state_dict()`), converted by the test with `import_torch_checkpoint` (strict);
- `gfl.npz`: the normalized 64x96 input (scale factor 0.5 of a 128x192 original), the head's
  outputs per level (NHWC) and the final detections in original-image pixels.

The model: mmdetection `GFL` as `gfl_r50_fpn_1x_coco` with a ResNet-18 (pytorch style), FPN of
16 channels from C3 (`start_level=1`, `add_extra_convs='on_output'`, 5 outputs: strides
8..128), `GFLHead` (4 classes, 16 channels, 4 stacked convs with GN(4 groups), reg_max 16,
octave base scale 8); test settings nms_pre 1000, score 0.05, NMS 0.6, 100 per image.
Weights as in make_mask_rcnn_golden.py: the backbone convs are views of one seeded pool (a
small checkpoint), BN statistics calibrated on the input then the affine parts randomized,
the rest seeded; the head's weights as make_gfl_golden.py's `randomize` (classification bias
-2: scores around the threshold, peaked distributions, scales != 1), then `gfl_cls` and
`gfl_reg` weights x 0.3 and the distributions' biases tilted to the first bins (the
backbone's features are larger than that script's random maps; on a 64x96 input a flat
distribution means boxes of the whole image): 100 detections of all 4 classes.

mmdetection 3.3 vs 2.11: the detector's forward (ResNet, FPN `on_output`, `GFLHead.forward`)
is the same code. Post-processing differs (make_gfl_golden.py's docstring: 3.3 keeps the top
`nms_pre` (anchor, class) pairs, 2.11 the top `nms_pre` anchors by their best class): the
detections here are 2.11's, built from 3.3's parts (`make_gfl_golden.detections_211`).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.runner.checkpoint import save_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_gfl_golden import STRIDES, C, detections_211, randomize  # noqa: E402
from make_mask_rcnn_golden import POOL, strided_view  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "gfl_detector")
FPN, FEAT, GROUPS = 16, 16, 4
INPUT_HW = (64, 96)
SCALE = 0.5
ORI_HW = (128, 192)
CLS_WEIGHT_SCALE = 0.3  # gfl_cls weights x 0.3 after `randomize`: scores 0.08-0.21
REG_WEIGHT_SCALE = 0.3  # and gfl_reg's x 0.3,
REG_BIN_SLOPE = 0.5  # its bias - 0.5 x bin: 100 detections of 15-100 px in the 128x192 image


def model_cfg() -> ConfigDict:
    return ConfigDict(
        type="GFL",
        backbone=dict(
            type="ResNet", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
            norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch",
        ),
        neck=dict(
            type="FPN", in_channels=[64, 128, 256, 512], out_channels=FPN, start_level=1,
            add_extra_convs="on_output", num_outs=5,
        ),
        bbox_head=dict(
            type="GFLHead", num_classes=C, in_channels=FPN, stacked_convs=4,
            feat_channels=FEAT, norm_cfg=dict(type="GN", num_groups=GROUPS, requires_grad=True),
            anchor_generator=dict(
                type="AnchorGenerator", ratios=[1.0], octave_base_scale=8,
                scales_per_octave=1, strides=list(STRIDES),
            ),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
            loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
            reg_max=16,
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        ),
        train_cfg=dict(
            assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1,
            debug=False,
        ),
        test_cfg=dict(
            nms_pre=1000, min_bbox_size=0, score_thr=0.05,
            nms=dict(type="nms", iou_threshold=0.6), max_per_img=100,
        ),
    )  # fmt: skip


def make_weights(model: torch.nn.Module, image: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=g)
    with torch.no_grad():
        for k, (name, p) in enumerate(list(model.named_parameters())):
            if name.startswith("backbone.") and p.ndim == 4:
                mod_name, leaf = name.rsplit(".", 1)
                mod = model.get_submodule(mod_name)
                setattr(mod, leaf, torch.nn.Parameter(strided_view(pool, tuple(p.shape), k)))
            elif p.ndim >= 2:
                std = (2.0 / int(np.prod(p.shape[1:]))) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.momentum = 1.0
            m.weight.fill_(1.0)
            m.bias.zero_()
        model.backbone.norm_eval, frozen = False, model.backbone.frozen_stages
        model.backbone.frozen_stages = -1  # (else train() keeps the stem and layer1 in eval)
        model.backbone.train()
        model.backbone(image)
        model.backbone.norm_eval, model.backbone.frozen_stages = True, frozen
        model.eval()
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    randomize(model.bbox_head)
    with torch.no_grad():  # the whole detector's features are larger: scores spread wider
        model.bbox_head.gfl_cls.weight.mul_(CLS_WEIGHT_SCALE)
        model.bbox_head.gfl_reg.weight.mul_(REG_WEIGHT_SCALE)
        # distributions peaked at the first bins (distances of 1-3 strides: boxes inside the
        # small image, where a near-uniform one means 8 strides, the whole image)
        bins = torch.arange(17, dtype=torch.float32).repeat(4)
        model.bbox_head.gfl_reg.bias.add_(-REG_BIN_SLOPE * bins)


def main() -> None:
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(model_cfg())
    image = torch.randn(1, 3, *INPUT_HW, generator=torch.Generator().manual_seed(1))
    make_weights(model, image)
    h, w = INPUT_HW
    metas = [dict(img_shape=(h, w), scale_factor=(SCALE, SCALE))]
    with torch.no_grad():
        cls_scores, bbox_preds = model.bbox_head(model.extract_feat(image))
        det = detections_211(model.bbox_head, cls_scores, bbox_preds, metas, 1000)
    os.makedirs(OUT, exist_ok=True)
    save_checkpoint(
        {"meta": {"mmdet_version": "3.3.0", "CLASSES": tuple("abcd")},
         "state_dict": model.state_dict()},
        os.path.join(OUT, "gfl.pth"),
    )  # fmt: skip
    rec = dict(
        image=image.numpy().transpose(0, 2, 3, 1).astype(np.float32),
        img_shape=np.array([h, w]),
        scale_factor=np.array([SCALE] * 4, np.float32),
        boxes=det["det1000_boxes_0"].astype(np.float32),
        scores=det["det1000_scores_0"].astype(np.float32),
        labels=det["det1000_labels_0"].astype(np.int64),
    )
    for lvl, (c, b) in enumerate(zip(cls_scores, bbox_preds, strict=True)):
        rec[f"cls_{lvl}"] = c.permute(0, 2, 3, 1).numpy()
        rec[f"reg_{lvl}"] = b.permute(0, 2, 3, 1).numpy()
    np.savez_compressed(os.path.join(OUT, "gfl.npz"), **rec)
    n = len(rec["scores"])
    print(f"{n} detections, labels {np.bincount(rec['labels'], minlength=C)}")
    print(f"scores {rec['scores'][:3]} .. {rec['scores'][-3:]}")
    for f in ("gfl.pth", "gfl.npz"):
        print(f, os.path.getsize(os.path.join(OUT, f)) // 1000, "KB")


if __name__ == "__main__":
    main()

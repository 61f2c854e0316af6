"""Golden files for a whole small Mask R-CNN, from real mmdetection 3.3 (2.11's test rules).

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_mask_rcnn_golden.py

Writes `tests/golden/mask_rcnn/` (read by tests/test_mask_rcnn_golden.py; the tests never
need mmdetection):
- `mask_rcnn.pth`: the checkpoint as mmdetection writes it (`mmengine.runner.checkpoint.
  save_checkpoint` of `{'meta': ..., 'state_dict': model.state_dict()}`), which the test
  converts with `fgd_jax.convert.import_torch_checkpoint` (mmdetection layout, strict);
- `mask_rcnn.npz`: the input image (already normalized, 64x96 network input of an original
  128x192 image: scale factor 0.5), the RPN proposals, the final detections (`boxes`,
  `scores`, `labels`, original-image pixels) and their pasted masks (`masks`, bits packed
  along the last axis by `np.packbits`), plus the 28x28 mask probabilities of each
  detection's class.

The model: mmdetection `MaskRCNN` as `mask_rcnn_r50_fpn` with a ResNet-18 (BasicBlock,
pytorch style), FPN of 16 channels (P2..P6, P6 by max-pool), RPN (16 channels, scale 8,
ratios 0.5/1/2, strides 4..64), `StandardRoIHead` (RoIAlign 7x7 / 14x14, aligned, sampling
0, finest scale 56), `Shared2FCBBoxHead` (32 channels, 3 classes, stds 0.1/0.1/0.2/0.2),
`FCNMaskHead` (4 convs of 16 channels, 28x28); test settings of `mask_rcnn_r50_fpn`: RPN
nms_pre 1000, max_per_img 1000, NMS 0.7, min_bbox_size 0; R-CNN score > 0.05, class-wise
NMS 0.5, 100 per image, masks at `>= 0.5`.

Size: a ResNet-18 holds 11M weights (45 MB). To keep the checkpoint small each conv / linear
conv weight of the backbone is an overlapping strided *view* of one shared seeded pool of
32768 normals (`torch.as_strided`: `w[o, i, kh, kw] = pool[off + s_o o + s_i i + 3 kh +
kw]`), which `torch.save` stores once (518 KB in all). The weights still differ per output
and input channel, and the checkpoint is a normal one (the loader reads the views into
ordinary arrays). The other tensors are seeded normals (convs / linears kaiming-scaled);
the backbone's BN statistics are those of the input image (calibrated by one train-mode
forward), its affine parts random; the RPN objectness and the box classifier are spread
(and the class biases set) so that the score threshold and the NMS have work and the 100
detections mix the 3 classes.

mmdetection 3.3 vs 2.11 for this test path: RPN `_predict_by_feat_single` (per level top
`nms_pre`, one `batched_nms` over the levels with the level as class, `max_per_img`),
`SingleRoIExtractor`, `Shared2FCBBoxHead` + `multiclass_nms`, `FCNMaskHead` and
`_do_paste_mask` are 2.11's code. 3.3's `StandardRoIHead.predict` keeps the detected boxes
in network-input pixels for the mask branch and rescales afterwards, where 2.11's
`simple_test_mask` rescales the boxes back by the scale factor: the same RoIs. 3.3's RPN
`_bbox_post_process` drops proposals with `w <= min_bbox_size or h <= min_bbox_size` whenever
`min_bbox_size >= 0`, so with 2.11's `min_bbox_size=0` it drops the zero-area boxes clipped
onto the image border; 2.11 filters only when `min_bbox_size > 0` (and then `w >= min`):
the config here says -1, which is 2.11's behaviour for 0 (5 such proposals here).
Pasting on CPU is per box (`skip_empty`), which equals the whole-image paste.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.runner.checkpoint import save_checkpoint

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "mask_rcnn")
C, FPN, FC, MASK = 3, 16, 32, 16
INPUT_HW = (64, 96)
SCALE = 0.5  # network input = original x 0.5
ORI_HW = (128, 192)
POOL = 32768
RPN_CLS_STD, CLS_STD = 0.1, 0.05  # spread of the RPN objectness and the class scores
CLS_BIAS = (-2.0, 0.5, 1.0, 0.0)  # classes 0, 1, 2, background: a mix of labels


def model_cfg() -> ConfigDict:
    roi = lambda s: dict(type="RoIAlign", output_size=s, sampling_ratio=0)  # noqa: E731
    return ConfigDict(
        type="MaskRCNN",
        backbone=dict(
            type="ResNet", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
            norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch",
        ),
        neck=dict(type="FPN", in_channels=[64, 128, 256, 512], out_channels=FPN, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=FPN, feat_channels=FPN,
            anchor_generator=dict(
                type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                strides=[4, 8, 16, 32, 64],
            ),
            bbox_coder=dict(
                type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4
            ),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(
                type="SingleRoIExtractor", roi_layer=roi(7), out_channels=FPN,
                featmap_strides=[4, 8, 16, 32],
            ),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=FPN, fc_out_channels=FC,
                roi_feat_size=7, num_classes=C,
                bbox_coder=dict(
                    type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                    target_stds=[0.1, 0.1, 0.2, 0.2],
                ),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
            mask_roi_extractor=dict(
                type="SingleRoIExtractor", roi_layer=roi(14), out_channels=FPN,
                featmap_strides=[4, 8, 16, 32],
            ),
            mask_head=dict(
                type="FCNMaskHead", num_convs=4, in_channels=FPN, conv_out_channels=MASK,
                num_classes=C,
                loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
            ),
        ),
        train_cfg=dict(  # mask_rcnn_r50_fpn's (unused here; the model needs one to build)
            rpn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3,
                              min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                             add_gt_as_proposals=False),
                allowed_border=-1, pos_weight=-1, debug=False,
            ),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000,
                              nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5,
                              min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                             add_gt_as_proposals=True),
                mask_size=28, pos_weight=-1, debug=False,
            ),
        ),
        test_cfg=dict(
            # min_bbox_size -1: 2.11's 0 (3.3 would drop zero-area proposals, see the docstring)
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                     min_bbox_size=-1),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5),
        ),
    )  # fmt: skip


def strided_view(pool: torch.Tensor, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """A `shape` view of `pool` (no copy): the trailing dims contiguous, dim 1 by a step of
    (their size + 2), dim 0 by a larger step, rows overlapping; `salt` shifts the start."""
    inner = int(np.prod(shape[2:]))
    tail = [int(np.prod(shape[k + 1 :])) for k in range(2, len(shape))]
    s1 = inner + 2
    span1 = (shape[1] - 1) * s1 + inner
    s0 = min(53 + inner, (POOL - span1) // max(shape[0] - 1, 1))
    strides = (s0, s1, *tail)
    span = (shape[0] - 1) * s0 + span1
    assert s0 >= 1 and span <= POOL, (shape, strides, span)
    return pool.as_strided(shape, strides, (salt * 9973) % (POOL - span + 1))


def make_weights(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Seeded weights (module docstring); the backbone's BN statistics are those of `image`
    (one forward in train mode, momentum 1), then its affine parts randomized."""
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
        # spread the RPN objectness and the class scores: thresholds and NMS have work
        for mod, std in (
            (model.rpn_head.rpn_cls, RPN_CLS_STD),
            (model.rpn_head.rpn_reg, 0.01),
            (model.roi_head.bbox_head.fc_cls, CLS_STD),
            (model.roi_head.bbox_head.fc_reg, 0.01),
        ):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
        b = model.roi_head.bbox_head.fc_cls.bias  # classes 0 / 1 / 2 / background
        b.copy_(torch.tensor(CLS_BIAS))


def main() -> None:
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(model_cfg())
    gi = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, *INPUT_HW, generator=gi)
    make_weights(model, image)
    sd = model.state_dict()
    backbone_views = sum(1 for k, v in sd.items() if k.startswith("backbone.") and v.ndim == 4)
    h, w = INPUT_HW
    meta = dict(
        img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w), ori_shape=ORI_HW,
        scale_factor=(SCALE, SCALE),
    )  # fmt: skip
    with torch.no_grad():
        feats = model.extract_feat(image)
        sample = DetDataSample(metainfo=meta)
        proposals = model.rpn_head.predict(feats, [sample], rescale=False)[0]
        res = model.roi_head.predict(feats, [proposals], [sample], rescale=True)[0]
        # the 28x28 probabilities of each detection's class (boxes in network-input pixels)
        boxes_in = res.bboxes * SCALE
        mask_res = model.roi_head._mask_forward(feats, torch.cat(
            [torch.zeros(len(boxes_in), 1), boxes_in], 1))  # fmt: skip
        probs = mask_res["mask_preds"].sigmoid()
        probs = probs[torch.arange(len(res.labels)), res.labels]
    n = len(res.bboxes)
    keep = 30  # masks stored for the top `keep` detections (file size)
    os.makedirs(OUT, exist_ok=True)
    save_checkpoint(
        {"meta": {"mmdet_version": "3.3.0", "CLASSES": ("a", "b", "c")}, "state_dict": sd},
        os.path.join(OUT, "mask_rcnn.pth"),
    )
    masks = res.masks.numpy().astype(bool)
    np.savez_compressed(
        os.path.join(OUT, "mask_rcnn.npz"),
        image=image.numpy().transpose(0, 2, 3, 1).astype(np.float32),
        img_shape=np.array([h, w]),
        ori_hw=np.array(ORI_HW),
        scale_factor=np.array([SCALE] * 4, np.float32),
        proposals=proposals.bboxes.numpy().astype(np.float32),
        proposal_scores=proposals.scores.numpy().astype(np.float32),
        boxes=res.bboxes.numpy().astype(np.float32),
        scores=res.scores.numpy().astype(np.float32),
        labels=res.labels.numpy().astype(np.int64),
        mask_probs=probs[:keep].numpy().astype(np.float32),
        masks=np.packbits(masks[:keep], axis=-1),
    )
    size = os.path.getsize(os.path.join(OUT, "mask_rcnn.pth"))
    print(f"{n} detections, {len(proposals)} proposals, labels {np.bincount(res.labels.numpy())}")
    print(f"scores {res.scores[:3].numpy()} .. {res.scores[-3:].numpy()}")
    print(f"mask pixels of the top {keep}: {masks[:keep].sum((1, 2))}")
    print(f"checkpoint {size / 1e3:.0f} KB ({backbone_views} backbone convs as pool views)")


if __name__ == "__main__":
    main()

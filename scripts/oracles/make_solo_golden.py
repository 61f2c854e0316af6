"""Golden files for SOLO parity tests, from real mmdetection 3.3 (its SOLO is 2.x's code).

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_solo_golden.py

Writes `tests/golden/solo/solo.npz` (read by tests/test_solo.py; the tests never need
mmdetection). A tiny `SOLOHead` (3 classes, 8 channels, 2 stacked convs, GN with 4 groups,
strides (8, 8, 16, 32, 32), `num_grids` (8, 7, 5, 4, 3), `scale_ranges` ((1, 24), (12, 48),
(24, 96), (48, 192), (96, 384)) so that the GTs of a 64x96 canvas reach several levels) with
seeded non-trivial weights (`conv_cls` bias 0 so that many cells score above the threshold)
runs on seeded FPN maps of a 64x96 canvas (P2..P6: 16x24, 8x12, 4x6, 2x3, 1x2) for 2 images:
  0: 4 GTs (an ellipse, a rectangle overlapping it, a ring, and one with an EMPTY bitmap,
     which mmdetection skips); two of them fall on the same grid cells of one level (the
     later GT overwrites the earlier);
  1: 3 GTs, one touching the canvas' bottom-right corner, one large (levels 2 and 3).

Recorded:
- `state/*`: the head's state dict (mmdetection names); `feat{l}`: the maps (NCHW);
- `train_mask{l}`, `train_cls{l}`: `forward` in training mode (logits);
- `test_mask{l}` (levels 2..4), `test_cls{l}`: `forward` in eval mode for image 0 (sigmoid
  masks upsampled to stride 4, category scores times the 2x2 local-maximum mask);
- per image i: `img{i}_bitmaps` (GT bitmaps over the canvas), `img{i}_boxes`, `img{i}_labels`,
  mmdetection's inputs to the cell assignment: `img{i}_center` (`center_of_mass` of each
  bitmap: (h, w)), `img{i}_rescaled_s{s}` (`mmcv.imrescale(bitmap, 1 / s)` for the mask
  strides s = 4, 8, 16); and `_get_targets_single`'s outputs per level:
  `img{i}_labels{l}` `[S, S]`, `img{i}_pos{l}` `[S^2]`, `img{i}_tmasks{l}` `[P, h, w]`;
- `loss_mask`, `loss_cls`: `loss_by_feat` of the training outputs for the batch of 2;
- matrix NMS: `mnms_masks` (30 random blobs 16x24), `mnms_labels`, `mnms_scores`, and
  `mask_matrix_nms(nms_pre=20, max_num=8, filter_thr=0.05, gaussian, sigma 2)`:
  `mnms_out_scores`, `mnms_out_labels`, `mnms_out_keep`; the same with the linear kernel
  (`mnms_lin_*`);
- final results, `predict_by_feat` of the eval outputs with `test_cfg` (nms_pre 20,
  score_thr 0.1, mask_thr 0.5, filter_thr 0.05, gaussian 2.0, max_per_img 10) for image 0
  with img_shape 60x90 (the canvas 64x96) and ori_shape 40x60: `res_scores`, `res_labels`,
  `res_masks [n, 40, 60] bool`;
- `det_keys`, `det_shapes` (json): the state dict keys and shapes of a full mmdetection
  `SOLO` (ResNet-18, FPN start_level 0 of 8 channels, this head) for the converter test.

mmdetection 3.3 vs 2.x (2.x `solo_head.py` of the 2.x branch and 3.3's read side by side):
- `SOLOHead.forward`, `resize_feats`, `_get_targets_single`, `center_of_mass`,
  `generate_coordinate`, `mask_matrix_nms`, `dice_loss` (`naive_dice=False`, eps 1e-3) and the
  focal loss are the same code; 2.x `loss` == 3.3 `loss_by_feat` (3.3 reads the boxes, masks
  and labels from `InstanceData`), 2.x `get_results` / `_get_results_single` == 3.3
  `predict_by_feat` / `_predict_by_feat_single` (3.3 adds dummy zero `bboxes` to the results;
  2.x's `SingleStageInstanceSegmentor.format_results` adds the same zero boxes).
- data: 3.3's `DetDataPreprocessor(pad_mask=True)` pads the GT masks to the batch shape, 2.x
  pads each image's masks to its own `pad_shape` (size_divisor 32); the rescaled masks are
  written top-left into zero targets in both, so the targets are equal.
- init: 3.3 and 2.x both use Normal(std 0.01) convs and bias_prob 0.01 on `conv_mask_list`
  and `conv_cls` (overwritten here by seeded weights anyway).
"""

from __future__ import annotations

import json
import os

import mmcv
import numpy as np
import torch
from mmdet.models.layers.matrix_nms import mask_matrix_nms
from mmdet.models.utils import center_of_mass
from mmdet.registry import MODELS
from mmdet.structures.mask import BitmapMasks
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "solo")
C, IN, GROUPS = 3, 8, 4
CANVAS = (64, 96)
STRIDES = (8, 8, 16, 32, 32)
NUM_GRIDS = (8, 7, 5, 4, 3)
SCALE_RANGES = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 384))
FEAT_SHAPES = ((16, 24), (8, 12), (4, 6), (2, 3), (1, 2))
TEST_CFG = dict(
    nms_pre=20,
    score_thr=0.1,
    mask_thr=0.5,
    filter_thr=0.05,
    kernel="gaussian",
    sigma=2.0,
    max_per_img=10,
)


def head_cfg() -> dict:
    return dict(
        type="SOLOHead",
        num_classes=C,
        in_channels=IN,
        stacked_convs=2,
        feat_channels=IN,
        strides=list(STRIDES),
        scale_ranges=SCALE_RANGES,
        pos_scale=0.2,
        num_grids=list(NUM_GRIDS),
        cls_down_index=0,
        loss_mask=dict(type="DiceLoss", use_sigmoid=True, loss_weight=3.0),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        norm_cfg=dict(type="GN", num_groups=GROUPS, requires_grad=True),
        test_cfg=ConfigDict(TEST_CFG),
    )


def ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[: CANVAS[0], : CANVAS[1]]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def gts():
    """Bitmaps, boxes (of the bitmaps, fractional jitter), labels of the two images."""
    e = ellipse(20.3, 30.6, 12.2, 17.5)
    r = np.zeros(CANVAS, np.uint8)
    r[14:40, 38:70] = 1
    ring = ellipse(44.0, 62.0, 14.0, 20.0) - ellipse(44.0, 62.0, 7.0, 10.0)
    empty = np.zeros(CANVAS, np.uint8)
    img0 = [e, r, ring, empty]
    box_empty = np.array([10.0, 40.0, 30.0, 60.0])
    a = np.zeros(CANVAS, np.uint8)
    a[3:12, 5:15] = 1
    corner = ellipse(55.0, 85.0, 14.0, 18.0)
    big = ellipse(32.0, 48.0, 26.0, 40.0)
    img1 = [a, corner, big]
    out = []
    for i, (maps, labels) in enumerate(((img0, [0, 2, 1, 2]), (img1, [1, 0, 2]))):
        boxes = []
        for m in maps:
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                boxes.append(box_empty)
                continue
            boxes.append([xs.min() - 0.3, ys.min() - 0.2, xs.max() + 1.2, ys.max() + 1.1])
        out.append((np.stack(maps), np.array(boxes, np.float32), np.array(labels, np.int64)))
        del i
    return out


def main() -> None:
    register_all_modules()
    torch.manual_seed(0)
    head = MODELS.build(head_cfg())
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("gn.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name == "conv_cls.bias":
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1))
    feats = [torch.randn(2, IN, h, w) for h, w in FEAT_SHAPES]
    out: dict[str, np.ndarray] = {f"state/{k}": v.numpy() for k, v in head.state_dict().items()}
    for lvl, f in enumerate(feats):
        out[f"feat{lvl}"] = f.numpy()
    head.train()
    with torch.no_grad():
        train_masks, train_cls = head(feats)
    head.eval()
    with torch.no_grad():
        test_masks, test_cls = head(feats)
    for lvl in range(5):
        out[f"train_mask{lvl}"] = train_masks[lvl].numpy()
        out[f"train_cls{lvl}"] = train_cls[lvl].numpy()
        out[f"test_cls{lvl}"] = test_cls[lvl][:1].numpy()
        if lvl >= 2:  # levels 0, 1: the sigmoid of train_mask (already at stride 4)
            out[f"test_mask{lvl}"] = test_masks[lvl][:1].numpy()

    featmap_sizes = [m.shape[-2:] for m in train_masks]
    batch, metas = [], []
    for i, (bitmaps, boxes, labels) in enumerate(gts()):
        inst = InstanceData()
        inst.bboxes = torch.from_numpy(boxes)
        inst.labels = torch.from_numpy(labels)
        inst.masks = BitmapMasks(bitmaps, *CANVAS)
        batch.append(inst)
        metas.append(dict(img_shape=CANVAS, pad_shape=CANVAS, batch_input_shape=CANVAS))
        tm, lab, pos = head._get_targets_single(inst, featmap_sizes=featmap_sizes)
        out[f"img{i}_bitmaps"] = bitmaps
        out[f"img{i}_boxes"] = boxes
        out[f"img{i}_labels"] = labels
        centers = [center_of_mass(torch.from_numpy(b).bool()) for b in bitmaps]
        out[f"img{i}_center"] = np.array([[float(h), float(w)] for h, w in centers], np.float32)
        for s in (4, 8, 16):
            out[f"img{i}_rescaled_s{s}"] = np.stack(
                [mmcv.imrescale(np.uint8(b), scale=1.0 / s) for b in bitmaps]
            )
        for lvl in range(5):
            out[f"img{i}_labels{lvl}"] = lab[lvl].numpy()
            out[f"img{i}_pos{lvl}"] = pos[lvl].numpy()
            out[f"img{i}_tmasks{lvl}"] = tm[lvl].numpy()
    with torch.no_grad():
        losses = head.loss_by_feat(list(train_masks), list(train_cls), batch, metas)
    out["loss_mask"] = np.array(float(losses["loss_mask"]))
    out["loss_cls"] = np.array(float(losses["loss_cls"]))

    rng = np.random.default_rng(3)
    n = 30
    blobs = []
    for _ in range(n):
        cy, cx = rng.uniform(2, 14), rng.uniform(2, 22)
        ry, rx = rng.uniform(2, 7), rng.uniform(2, 9)
        yy, xx = np.mgrid[:16, :24]
        blobs.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    masks = torch.from_numpy(np.stack(blobs))
    labels = torch.from_numpy(rng.integers(0, 2, n))
    scores = torch.from_numpy(rng.permutation(np.linspace(0.12, 0.95, n)).astype(np.float32))
    out["mnms_masks"] = masks.numpy()
    out["mnms_labels"] = labels.numpy()
    out["mnms_scores"] = scores.numpy()
    for tag, kernel in (("mnms", "gaussian"), ("mnms_lin", "linear")):
        s, lab, _, keep = mask_matrix_nms(
            masks, labels, scores, filter_thr=0.05, nms_pre=20, max_num=8, kernel=kernel, sigma=2.0
        )
        out[f"{tag}_out_scores"] = s.numpy()
        out[f"{tag}_out_labels"] = lab.numpy()
        out[f"{tag}_out_keep"] = keep.numpy()

    meta = dict(img_shape=(60, 90), ori_shape=(40, 60), pad_shape=CANVAS)
    with torch.no_grad():
        res = head.predict_by_feat([m[:1] for m in test_masks], [c[:1] for c in test_cls], [meta])[
            0
        ]
    out["res_scores"] = res.scores.numpy()
    out["res_labels"] = res.labels.numpy()
    out["res_masks"] = res.masks.numpy()

    det = MODELS.build(
        dict(
            type="SOLO",
            backbone=dict(type="ResNet", depth=18, out_indices=(0, 1, 2, 3), style="pytorch"),
            neck=dict(
                type="FPN",
                in_channels=[64, 128, 256, 512],
                out_channels=IN,
                start_level=0,
                num_outs=5,
            ),
            mask_head={k: v for k, v in head_cfg().items() if k != "test_cfg"},
            test_cfg=TEST_CFG,
        )
    )
    sd = det.state_dict()
    keys = sorted(k for k in sd if not k.endswith("num_batches_tracked"))
    out["det_keys"] = np.array(keys)
    out["det_shapes"] = np.array(json.dumps({k: list(sd[k].shape) for k in keys}))

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "solo.npz")
    np.savez_compressed(path, **out)
    print(
        f"wrote {path} ({os.path.getsize(path)} bytes): loss_mask {out['loss_mask']:.6f} "
        f"loss_cls {out['loss_cls']:.6f}, {len(res.scores)} results, "
        f"positives per level img0 {[int(out[f'img0_pos{lv}'].sum()) for lv in range(5)]} "
        f"img1 {[int(out[f'img1_pos{lv}'].sum()) for lv in range(5)]}"
    )


if __name__ == "__main__":
    main()

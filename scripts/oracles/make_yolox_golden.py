"""Golden files for YOLOX from real mmdetection (tests/test_yolox.py reads them).

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, see /work/shared/oracles/README.md):

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_yolox_golden.py

Writes `tests/golden/yolox/{weights,forward,loss,dets}.npz` (about 0.4 MB together):
- weights: the state dict of a tiny YOLOX (CSPDarknet deepen 0.33 / widen 0.0625, YOLOXPAFPN
  (16, 32, 64) -> 16 channels, 1 CSP block, YOLOXHead 16 channels, 3 classes), every value
  rounded to float16 (stored as float16, exact in float32 / float64): mmdet's init, BN scale /
  bias randomized, the reg convs' weights halved and their size biases + log(32 / stride)
  (boxes ~32 px: dynamic k > 1), cls / obj biases N(-2, 1); then the BN running statistics
  set to the batch statistics of the golden input (momentum None for one train-mode pass),
  so eval-mode activations are O(1).
- forward: the input `[2, 64, 96, 3]` (NHWC, raw 0-255 pixels as YOLOX's pipeline feeds them),
  the eval-mode backbone / neck / head outputs (NHWC, float64: `model.double()`), the
  train-mode (batch statistics) neck outputs and the running statistics of a few BN layers
  after that one train-mode pass (momentum 0.03).
- loss: GT of two images (3 and 2 boxes), mmdet `YOLOXHead.loss_by_feat` with `use_l1=True`
  on the eval-mode head outputs cast to float32 (stored; 3.3's SimOTAAssigner fails in
  float64, it writes float64 IoUs into its float32 `max_overlaps`): the four losses, their
  gradients w.r.t. the head outputs (sum of the losses), and the SimOTA assignment per image
  (`gt_inds - 1`, the IoUs of the positives), captured from `SimOTAAssigner.assign`.
- dets: `predict_by_feat(rescale=True)` (score_thr 0.01, nms 0.65) on the head outputs cast to
  float32, scale factors (1.5, 1.25) and (0.8, 0.8): boxes, scores, labels per image.

mmdetection 3.3 vs 2.x (2.19-2.28, which fgd-jax follows) on these code paths, read from both:
- `SimOTAAssigner`: 3.3 takes `pred_instances.scores` already square-rooted (the head calls
  `scores.sqrt_()`), 2.x takes the product and square-roots inside; 3.3 computes the class
  cost BCE in float32 (`.to(torch.float32)`, AMP off) and casts back, 2.x in the input dtype.
  Same cost otherwise (INF 1e5, EPS 1e-7, centre radius 2.5, top-10 dynamic k, min-cost
  de-duplication). `max_overlaps` is float32 in both.
- `YOLOXHead.loss_by_feat`: 3.3 returns `0 * sum` for cls / bbox / l1 without positives, 2.x
  sums an empty selection: both 0. Same normalisation `max(reduce_mean(num_pos), 1)`.
- `predict_by_feat`: 3.3 rescales per image in `_bbox_post_process` (scale_factor (w, h)
  repeated), 2.x divides all boxes by the (w, h, w, h) scale factor before NMS: same boxes.
- Backbone / neck / head layers: identical modules and names.
So the 3.3 numbers are the 2.x numbers here; the float64 comparison is exact up to the
float32 class cost and IoU targets above (~1e-7 relative).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "yolox")
NUM_CLASSES = 3
DEEPEN, WIDEN = 0.33, 0.0625
NECK_IN, NECK_OUT = (16, 32, 64), 16
GT = [
    (
        np.array([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0], [60.0, 40.0, 70.0, 52.0]]),
        np.array([0, 2, 1]),
    ),
    (np.array([[10.0, 12.0, 70.0, 60.0], [70.0, 5.0, 94.0, 28.0]]), np.array([1, 1])),
]
SCALE_FACTORS = [(1.5, 1.25), (0.8, 0.8)]
BN_PROBES = (
    "backbone.stem.conv.bn",
    "backbone.stage4.1.conv2.bn",
    "neck.out_convs.0.bn",
    "bbox_head.multi_level_reg_convs.2.1.bn",
)


def build():
    register_all_modules()
    backbone = MODELS.build(dict(type="CSPDarknet", deepen_factor=DEEPEN, widen_factor=WIDEN))
    neck = MODELS.build(
        dict(type="YOLOXPAFPN", in_channels=list(NECK_IN), out_channels=NECK_OUT, num_csp_blocks=1)
    )
    head = MODELS.build(
        dict(
            type="YOLOXHead",
            num_classes=NUM_CLASSES,
            in_channels=NECK_OUT,
            feat_channels=NECK_OUT,
            train_cfg=ConfigDict(assigner=dict(type="SimOTAAssigner", center_radius=2.5)),
            test_cfg=ConfigDict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.65)),
        )
    )
    model = torch.nn.ModuleDict(dict(backbone=backbone, neck=neck, bbox_head=head))
    for m in (backbone, neck, head):
        m.init_weights()
    return model


def run(model, x):
    feats_b = model["backbone"](x)
    feats_n = model["neck"](feats_b)
    cls, reg, obj = model["bbox_head"](feats_n)
    return feats_b, feats_n, (cls, reg, obj)


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build()
    x = torch.from_numpy(rng.uniform(0, 255, (2, 3, 64, 96))).float()

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for p in model.parameters():  # random weights, float16-exact
            p.copy_(p.half().float())
        for m in bns:
            m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, m.weight.shape)))
            m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.2, m.bias.shape)))
        head = model["bbox_head"]
        for conv, stride in zip(head.multi_level_conv_reg, (8, 16, 32), strict=True):
            conv.weight.mul_(0.5)  # boxes about 32 px wide: IoUs with the GTs up to ~0.7
            conv.bias[2:] += float(np.log(32 / stride))
        for conv in list(head.multi_level_conv_cls) + list(head.multi_level_conv_obj):
            conv.bias.copy_(torch.from_numpy(rng.normal(-2.0, 1.0, conv.bias.shape)))
        for p in model.parameters():
            p.copy_(p.half().float())
        model.train()
        for m in bns:
            m.momentum = None  # one pass: running stats = the batch's
            m.reset_running_stats()
        run(model, x)
        for m in bns:
            m.momentum = 0.03
            m.running_mean.copy_(m.running_mean.half().float())
            m.running_var.copy_(m.running_var.half().float())
    state = {
        k: v.detach().numpy().astype(np.float16)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert np.array_equal(state[k].astype(np.float32), v.numpy()), k
    os.makedirs(OUT, exist_ok=True)
    np.savez_compressed(os.path.join(OUT, "weights.npz"), **state)

    model = model.double()
    xd = x.double()
    fwd = {"image": xd.permute(0, 2, 3, 1).numpy()}
    model.eval()
    with torch.no_grad():
        fb, fn, (cls, reg, obj) = run(model, xd)
    for i, t in enumerate(fb):
        fwd[f"backbone_{i}"] = nhwc(t)
    for i, t in enumerate(fn):
        fwd[f"neck_{i}"] = nhwc(t)
    for i in range(3):
        fwd[f"cls_{i}"], fwd[f"reg_{i}"], fwd[f"obj_{i}"] = nhwc(cls[i]), nhwc(reg[i]), nhwc(obj[i])
    model.train()
    with torch.no_grad():
        _, fn_train, _ = run(model, xd)
    for i, t in enumerate(fn_train):
        fwd[f"train_neck_{i}"] = nhwc(t)
    mods = dict(model.named_modules())
    for name in BN_PROBES:
        fwd[f"stats_mean:{name}"] = mods[name].running_mean.numpy()
        fwd[f"stats_var:{name}"] = mods[name].running_var.numpy()
    np.savez_compressed(os.path.join(OUT, "forward.npz"), **fwd)

    # ---------------------------------------------------------------------- loss
    head = model["bbox_head"]
    head.use_l1 = True
    captured = []
    assign = head.assigner.assign

    def capture(*args, **kwargs):
        res = assign(*args, **kwargs)
        captured.append((res.gt_inds.numpy() - 1, res.max_overlaps.numpy()))
        return res

    head.assigner.assign = capture
    # float32: 3.3's SimOTAAssigner writes float64 IoUs into a float32 tensor and fails
    head.float()
    outs = [
        [t.detach().float().clone().requires_grad_(True) for t in group]
        for group in (cls, reg, obj)
    ]
    loss = {}
    for name, group in zip(("cls", "reg", "obj"), outs, strict=True):
        for i, t in enumerate(group):
            loss[f"{name}_{i}"] = nhwc(t)
    gts = [
        InstanceData(bboxes=torch.from_numpy(b).float(), labels=torch.from_numpy(lab))
        for b, lab in GT
    ]
    metas = [dict(img_shape=(64, 96), pad_shape=(64, 96)) for _ in GT]
    losses = head.loss_by_feat(*outs, gts, metas)
    total = sum(losses.values())
    total.backward()
    loss.update({k: v.detach().numpy() for k, v in losses.items()})
    for name, group in zip(("cls", "reg", "obj"), outs, strict=True):
        for i, t in enumerate(group):
            loss[f"grad_{name}_{i}"] = nhwc(t.grad)
    g = max(len(b) for b, _ in GT)
    loss["gt_boxes"] = np.stack([np.pad(b, ((0, g - len(b)), (0, 0))) for b, _ in GT])
    loss["gt_labels"] = np.stack(
        [np.pad(lab, (0, g - len(lab)), constant_values=-1) for _, lab in GT]
    )
    loss["gt_valid"] = np.stack([np.arange(g) < len(b) for b, _ in GT])
    loss["assigned"] = np.stack([a for a, _ in captured])
    loss["max_overlaps"] = np.stack([o for _, o in captured])
    np.savez_compressed(os.path.join(OUT, "loss.npz"), **loss)

    # ------------------------------------------------------------------ detections
    c32, r32, o32 = ([t.detach().float() for t in group] for group in (cls, reg, obj))
    metas = [dict(img_shape=(64, 96), scale_factor=s) for s in SCALE_FACTORS]
    with torch.no_grad():
        res = head.predict_by_feat(c32, r32, o32, batch_img_metas=metas, rescale=True)
    dets = {"scale_factor": np.array([[w, h, w, h] for w, h in SCALE_FACTORS], np.float32)}
    for i in range(3):
        dets[f"cls_{i}"], dets[f"reg_{i}"], dets[f"obj_{i}"] = (
            nhwc(c32[i]),
            nhwc(r32[i]),
            nhwc(o32[i]),
        )
    for i, r in enumerate(res):
        dets[f"boxes_{i}"] = r.bboxes.numpy()
        dets[f"scores_{i}"] = r.scores.numpy()
        dets[f"labels_{i}"] = r.labels.numpy()
    np.savez_compressed(os.path.join(OUT, "dets.npz"), **dets)
    print({k: float(v) for k, v in losses.items()}, [len(r.bboxes) for r in res])
    print("positives per image", [int((a >= 0).sum()) for a, _ in captured])


if __name__ == "__main__":
    main()

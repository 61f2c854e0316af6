"""Golden files for GFL parity tests, from real mmdetection 3.3 set to mmdetection 2.11's rules.

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_gfl_golden.py

Writes `tests/golden/gfl/gfl_head.npz` (read by tests/test_gfl.py; the tests never need
mmdetection). A tiny `GFLHead` (4 classes, 16 channels, 4 stacked convs, GN with 4 groups,
reg_max 16, the 5 strides 8..128 of a 64x96 canvas: maps 8x12, 4x6, 2x3, 1x2, 1x1) with seeded
non-trivial weights is run on seeded FPN maps for a batch of 3 images:
  0: the full 64x96 image, 3 GT boxes (the tests pad a 4th, invalid one) and a crowd box
     over the third GT (with `ignore_iof_thr=0.5` it removes anchors from that GT's
     candidates);
  1: img_shape 40x60 (pad shape 64x64: the anchors of P3's last 4 columns are invalid),
     2 GT boxes;
  2: no GT box at all (every anchor negative; 2.11's per-image floor of the positive count).
GT coordinates are fractional so no two anchor centres are equally far from a GT centre
(torch's `topk` order among equal distances is unspecified; ours keeps the lower index).

Recorded: the state dict (mmdetection names), the maps, the head outputs, the ATSS assignment
(`gt_inds` over all anchors, mmdetection encoding, -1 on invalid anchors) with the GFL config
(`ignore_iof_thr=-1`: crowd boxes play no part) and with `ignore_iof_thr=0.5`, the three
losses for both settings, and the detections (`rescale=True`) with `nms_pre` 1000 and 20.

Where mmdetection 3.3 differs from 2.11, this script follows 2.11 built from 3.3's parts
(`get_anchors`, `get_targets`, `loss_by_feat_single`, `integral`, `bbox_coder`,
`multiclass_nms`, which are 2.11's code):
- loss normaliser of QFL: 2.11 `max(reduce_mean(sum_i max(num_pos_i, 1)), 1)`; 3.3
  `reduce_mean(sum_i max(num_pos_i, 1))` (`SamplingResult.avg_factor`, its `num_pos` floored
  at 1) without the final floor, equal on one process. Recorded both (`*_loss_*`: 2.11,
  `*_loss33_*`: 3.3's own `loss_by_feat`); the GIoU / DFL normaliser is the same in both.
- inference: 2.11 `_get_bboxes` keeps the top `nms_pre` anchors by their best class score,
  then `multiclass_nms` thresholds the (anchor, class) scores; 3.3 `filter_scores_and_topk`
  keeps the top `nms_pre` (anchor, class) pairs above `score_thr` and `_bbox_post_process`
  drops zero-size boxes when `min_bbox_size >= 0`. Recorded 2.11's rule.
- ATSSAssigner, GFLHead.forward, QFL, DFL, GIoULoss, bbox2distance (eps 0.1) and
  DistancePointBBoxCoder are the same code in both versions (read side by side).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmdet.models.layers import multiclass_nms
from mmdet.models.task_modules.assigners import ATSSAssigner
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "gfl")
C, IN, FEAT, GROUPS = 4, 16, 16, 4
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (64, 96)
IMG_SHAPES = ((64, 96), (40, 60), (64, 96))
SCALE_FACTORS = ((1.0, 1.0, 1.0, 1.0), (0.5, 0.625, 0.5, 0.625), (2.0, 2.0, 2.0, 2.0))
GT = (
    np.array([[5.3, 7.1, 33.7, 41.9], [28.6, 18.2, 61.4, 52.7], [40.2, 3.9, 90.1, 60.3]]),
    np.array([[3.4, 5.2, 21.7, 27.3], [22.9, 10.6, 57.2, 38.1]]),
    np.zeros((0, 4)),
)
LABELS = (np.array([0, 2, 3]), np.array([1, 2]), np.zeros((0,), np.int64))
CROWD = (np.array([[44.3, 2.2, 96.0, 63.1]]), np.zeros((0, 4)), np.zeros((0, 4)))


def build_head(ignore_iof_thr: float = -1.0, nms_pre: int = 1000) -> torch.nn.Module:
    cfg = dict(
        type="GFLHead",
        num_classes=C,
        in_channels=IN,
        feat_channels=FEAT,
        stacked_convs=4,
        norm_cfg=dict(type="GN", num_groups=GROUPS, requires_grad=True),
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=list(STRIDES),
        ),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        train_cfg=ConfigDict(
            assigner=dict(type="ATSSAssigner", topk=9, ignore_iof_thr=ignore_iof_thr),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        test_cfg=ConfigDict(
            nms_pre=nms_pre,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type="nms", iou_threshold=0.6),
            max_per_img=100,
        ),
    )
    return MODELS.build(cfg)


def randomize(head: torch.nn.Module) -> None:
    """Seeded weights that make the outputs non-trivial: peaked distributions, class scores
    spread around the 0.05 threshold, scales != 1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.startswith("scales"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
            elif name.endswith("gn.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 4:
                fan_in = p.shape[1] * 9
                std = (2.0 / fan_in) ** 0.5 * (2.0 if "gfl_reg" in name else 1.0)
                p.copy_(std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        head.gfl_cls.bias.add_(-2.0)


def metas() -> list[dict]:
    out = []
    for (h, w), sf in zip(IMG_SHAPES, SCALE_FACTORS, strict=True):
        pad = (int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32))
        out.append(
            dict(
                img_shape=(h, w),
                pad_shape=pad,
                batch_input_shape=CANVAS,
                scale_factor=(sf[0], sf[1]),
            )
        )
    return out


def instances(i: int) -> tuple[InstanceData, InstanceData]:
    gt = InstanceData(
        bboxes=torch.tensor(GT[i], dtype=torch.float32),
        labels=torch.tensor(LABELS[i], dtype=torch.long),
    )
    ign = InstanceData(bboxes=torch.tensor(CROWD[i], dtype=torch.float32))
    return gt, ign


def loss_211(head, cls_scores, bbox_preds, img_metas) -> tuple[dict, dict]:
    """2.11 `GFLHead.loss` from 3.3's parts; also 3.3's own `loss_by_feat`."""
    gts, igns = zip(*[instances(i) for i in range(len(img_metas))], strict=True)
    sizes = [c.shape[-2:] for c in cls_scores]
    anchors, valid = head.get_anchors(sizes, img_metas, device="cpu")
    (anchor_list, labels_list, weights_list, targets_list, _, _) = head.get_targets(
        anchors, valid, list(gts), img_metas, batch_gt_instances_ignore=list(igns)
    )
    num_pos = sum((lab < C).sum(1) for lab in labels_list)  # per image
    num_total = max(float(torch.clamp(num_pos, min=1).sum()), 1.0)
    lc, lb, ld, wsum = [], [], [], []
    for lvl in range(len(STRIDES)):
        a, b, c, w = head.loss_by_feat_single(
            anchor_list[lvl],
            cls_scores[lvl],
            bbox_preds[lvl],
            labels_list[lvl],
            weights_list[lvl],
            targets_list[lvl],
            head.prior_generator.strides[lvl],
            avg_factor=num_total,
        )
        lc.append(a), lb.append(b), ld.append(c), wsum.append(w)
    avg = max(float(sum(wsum)), 1.0)
    ours = dict(
        loss_cls=float(sum(lc)),
        loss_bbox=float(sum(lb)) / avg,
        loss_dfl=float(sum(ld)) / avg,
        num_pos=num_pos.numpy(),
        labels=torch.cat(labels_list, 1).numpy(),
        label_weights=torch.cat(weights_list, 1).numpy(),
    )
    l33 = head.loss_by_feat(
        cls_scores, bbox_preds, list(gts), img_metas, batch_gt_instances_ignore=list(igns)
    )
    return ours, {k: float(sum(v)) for k, v in l33.items()}


def assignment(head, sizes, img_metas, ignore_iof_thr: float) -> np.ndarray:
    """ATSS `gt_inds` over all anchors per image (mmdetection encoding), -1 where invalid."""
    anchors, valid = head.get_anchors(sizes, img_metas, device="cpu")
    assigner = ATSSAssigner(topk=9, ignore_iof_thr=ignore_iof_thr)
    out = []
    for i in range(len(img_metas)):
        flat, flags = torch.cat(anchors[i]), torch.cat(valid[i])
        counts = [int(f.sum()) for f in valid[i]]
        gt, ign = instances(i)
        res = assigner.assign(InstanceData(priors=flat[flags]), counts, gt, ign)
        full = torch.full((flat.shape[0],), -1, dtype=torch.long)
        full[flags] = res.gt_inds
        out.append(full.numpy())
    return np.stack(out)


def detections_211(head, cls_scores, bbox_preds, img_metas, nms_pre: int) -> dict:
    """2.11 `GFLHead._get_bboxes(rescale=True)` + `multiclass_nms` from 3.3's parts."""
    sizes = [c.shape[-2:] for c in cls_scores]
    anchors = head.prior_generator.grid_priors(sizes, device="cpu")
    batch = cls_scores[0].shape[0]
    out = {}
    for i in range(batch):
        boxes_l, scores_l = [], []
        for cls, reg, stride, anc in zip(cls_scores, bbox_preds, STRIDES, anchors, strict=True):
            scores = cls[i].permute(1, 2, 0).reshape(-1, C).sigmoid()
            dist = head.integral(reg[i].permute(1, 2, 0)) * stride
            dist = dist.reshape(-1, 4)
            if 0 < nms_pre < scores.shape[0]:
                _, idx = scores.max(-1)[0].topk(nms_pre)
                scores, dist, anc = scores[idx], dist[idx], anc[idx]
            boxes = head.bbox_coder.decode(
                head.anchor_center(anc), dist, max_shape=img_metas[i]["img_shape"]
            )
            boxes_l.append(boxes)
            scores_l.append(scores)
        boxes = torch.cat(boxes_l)
        sf = img_metas[i]["scale_factor"]
        boxes = boxes / boxes.new_tensor([sf[0], sf[1], sf[0], sf[1]])
        scores = torch.cat(scores_l)
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], 1)
        dets, labels = multiclass_nms(boxes, scores, 0.05, dict(type="nms", iou_threshold=0.6), 100)
        out[f"det{nms_pre}_boxes_{i}"] = dets[:, :4].numpy()
        out[f"det{nms_pre}_scores_{i}"] = dets[:, 4].numpy()
        out[f"det{nms_pre}_labels_{i}"] = labels.numpy()
    return out


def main() -> None:
    register_all_modules()
    torch.manual_seed(0)
    head = build_head()
    randomize(head)
    head.eval()
    g = torch.Generator().manual_seed(1)
    sizes = [(int(np.ceil(CANVAS[0] / s)), int(np.ceil(CANVAS[1] / s))) for s in STRIDES]
    feats = [torch.randn((3, IN, h, w), generator=g) for h, w in sizes]
    with torch.no_grad():
        cls_scores, bbox_preds = head(feats)
    img_metas = metas()
    rec: dict[str, np.ndarray] = {}
    for k, v in head.state_dict().items():
        rec["sd/" + k] = v.numpy()
    for lvl, (f, c, b) in enumerate(zip(feats, cls_scores, bbox_preds, strict=True)):
        rec[f"feat_{lvl}"] = f.permute(0, 2, 3, 1).numpy()  # NHWC
        rec[f"cls_{lvl}"] = c.permute(0, 2, 3, 1).numpy()
        rec[f"reg_{lvl}"] = b.permute(0, 2, 3, 1).numpy()
    gmax = max(len(x) for x in GT) + 1  # one padded slot in every image
    boxes = np.zeros((3, gmax, 4), np.float32)
    labels = np.full((3, gmax), -1, np.int32)
    valid = np.zeros((3, gmax), bool)
    for i, (b, lab) in enumerate(zip(GT, LABELS, strict=True)):
        boxes[i, : len(b)], labels[i, : len(b)], valid[i, : len(b)] = b, lab, True
    crowd = np.zeros((3, 1, 4), np.float32)
    crowd_valid = np.zeros((3, 1), bool)
    for i, b in enumerate(CROWD):
        crowd[i, : len(b)], crowd_valid[i, : len(b)] = b, True
    rec.update(
        gt_boxes=boxes,
        gt_labels=labels,
        gt_valid=valid,
        ignore_boxes=crowd,
        ignore_valid=crowd_valid,
        img_shape=np.array(IMG_SHAPES, np.int32),
        scale_factor=np.array(SCALE_FACTORS, np.float32),
    )
    for thr, tag in ((-1.0, "cfg"), (0.5, "ign")):
        h = build_head(ignore_iof_thr=thr)
        h.load_state_dict(head.state_dict())
        rec[f"assign_{tag}"] = assignment(h, sizes, img_metas, thr)
        with torch.no_grad():
            l211, l33 = loss_211(h, cls_scores, bbox_preds, img_metas)
        for k, v in l211.items():
            rec[f"{tag}_{k}"] = np.asarray(v)
        for k, v in l33.items():
            rec[f"{tag}_loss33_{k.split('_')[1]}"] = np.asarray(v)
        print(tag, {k: v for k, v in l211.items() if k.startswith("loss")}, "3.3:", l33)
        print(tag, "positives per image", l211["num_pos"])
    with torch.no_grad():
        for nms_pre in (1000, 20):
            rec.update(detections_211(head, cls_scores, bbox_preds, img_metas, nms_pre))
    print("detections per image", [len(rec[f"det1000_scores_{i}"]) for i in range(3)])
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "gfl_head.npz")
    np.savez_compressed(path, **rec)
    print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()

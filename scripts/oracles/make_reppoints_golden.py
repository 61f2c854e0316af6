"""Golden file for RepPoints parity tests, from real mmdetection 3.3 set to 2.11's rules.

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_reppoints_golden.py

Writes `tests/golden/reppoints/reppoints.npz` (read by tests/test_reppoints.py; the tests never
need mmdetection). The model is the `reppoints-moment_*_fpn-gn_head-gn` neck and head at a tiny
width: mmdetection `FPN(in_channels=(8, 16, 32, 64), out_channels=16, start_level=1,
add_extra_convs='on_input', num_outs=5, norm_cfg=GN(4 groups))` and `RepPointsHead(4 classes,
in/feat/point_feat channels 16, stacked_convs 3, GN(4), 9 points, gradient_mul 0.1,
point_base_scale 4, moment transform)` with the config's train / test settings, seeded
non-trivial weights (GN affine, `moment_transfer` (0.1, -0.2), init points spread over a few
cells so the deformable convs sample off the grid and outside the maps) on seeded backbone maps
C2..C5 of a 64x96 canvas (16x24 .. 2x3; P3..P7 8x12, 4x6, 2x3, 1x2, 1x1; mmcv's `DeformConv2d`
pads the 1x1 / 1x2 maps to the kernel and crops, the same numbers as the torchvision rule). The
backbone is left out: ResNet / ResNeXt (DCN too) have their own golden tests, and the full
detector is only their composition (tests/test_reppoints.py builds it).

Batch of 3 images:
  0: 64x96, 4 GT boxes (one 3x4 px: its PointAssigner level is below P3 and clamped), the
     tests pad a 5th, invalid slot;
  1: img_shape 40x60 (pad shape 64x64: P3's last 4 columns are invalid points), 2 GT boxes;
  2: no GT box.
GT centres are fractional so no two points are equally far from a GT centre (torch's `topk`
order among equal distances is unspecified; ours keeps the lower index).

Recorded: the neck + head state dict (`neck.*`, `bbox_head.*`), the maps `c{i}` (NHWC), the
neck's `fpn_convs.{l}.conv` outputs (`pre{l}`, before GN: what FGD distills) and outputs
(`p{l}`), the head outputs (`cls_{l}`, `init_{l}`, `refine_{l}`, NHWC, channels as
mmdetection's), the same in float64 (`*_f64`, `model.double()`), both stages' assignments
(`assign_init`, `assign_refine`: `gt_inds` over all points, mmdetection encoding, -1 on
invalid points), the refine-stage labels / label weights, the three losses (3.3's
`loss_by_feat`, equal to 2.11's: below), and the detections (`rescale=True`) for `nms_pre`
1000 and 10 by 2.11's rule.

Also writes `tests/golden/reppoints/reppoints_x101_dcn_keys.npz`: the state-dict keys and shapes
(no values) of the whole `reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco` detector
(2.x name `reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco`, the FGD teacher) built
from mmdetection's own config, so the test can check that its checkpoint converts strictly into
`reppoints_model(depth=101, groups=32, base_width=4, dcn='DCN')`.

mmdetection 3.3 vs 2.11 here (2.11's `reppoints_head.py` read side by side):
- `forward_single`, `points2bbox`, `offset_to_pts`, `centers_to_bboxes`, the refine
  proposals, `loss_single` / `loss_by_feat_single`, `PointAssigner`, `MaxIoUAssigner` and
  `FPN` are the same code.
- loss normalisers: 2.11 `num_total_pos = sum_i max(num_pos_i, 1)` of each stage
  (`PseudoSampler`, focal loss: `sampling=False`); 3.3 `sum_i SamplingResult.avg_factor` with
  `avg_factor = max(num_pos, 1)` (`avg_factor_with_neg=False` for the `PseudoSampler`): equal.
- valid flags: 2.11 `get_points` from each image's `pad_shape` with `ceil(pad / stride)`; 3.3
  `MlvlPointGenerator.valid_flags` the same.
- inference: 2.11 `_get_bboxes_single` keeps the top `nms_pre` points by their best class
  score, decodes `bbox * stride + point` clipped to `img_shape`, divides by `scale_factor`,
  then `multiclass_nms` thresholds the (point, class) scores at `score_thr`; 3.3's
  `filter_scores_and_topk` keeps the top `nms_pre` (point, class) pairs above `score_thr` and
  `_bbox_post_process` drops zero-size boxes. Recorded 2.11's rule, built here from 3.3's
  `points2bbox` and `multiclass_nms`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmdet.models.layers import multiclass_nms
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "reppoints")
C, WIDTH, GROUPS = 4, 16, 4
IN_CHANNELS = (8, 16, 32, 64)
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (64, 96)
IMG_SHAPES = ((64, 96), (40, 60), (64, 96))
SCALE_FACTORS = ((1.0, 1.0, 1.0, 1.0), (0.5, 0.625, 0.5, 0.625), (2.0, 2.0, 2.0, 2.0))
GT = (
    np.array(
        [
            [5.3, 7.1, 33.7, 41.9],
            [28.6, 18.2, 61.4, 52.7],
            [40.2, 3.9, 90.1, 60.3],
            [70.3, 40.6, 73.4, 44.9],
        ]
    ),
    np.array([[3.4, 5.2, 21.7, 27.3], [22.9, 10.6, 57.2, 38.1]]),
    np.zeros((0, 4)),
)
LABELS = (np.array([0, 2, 3, 1]), np.array([1, 2]), np.zeros((0,), np.int64))
GN = dict(type="GN", num_groups=GROUPS, requires_grad=True)


def build(nms_pre: int = 1000) -> tuple[torch.nn.Module, torch.nn.Module]:
    neck = MODELS.build(
        dict(
            type="FPN",
            in_channels=list(IN_CHANNELS),
            out_channels=WIDTH,
            start_level=1,
            add_extra_convs="on_input",
            num_outs=5,
            norm_cfg=GN,
        )
    )
    head = MODELS.build(
        dict(
            type="RepPointsHead",
            num_classes=C,
            in_channels=WIDTH,
            feat_channels=WIDTH,
            point_feat_channels=WIDTH,
            stacked_convs=3,
            num_points=9,
            gradient_mul=0.1,
            point_strides=list(STRIDES),
            point_base_scale=4,
            norm_cfg=GN,
            loss_cls=dict(
                type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0
            ),
            loss_bbox_init=dict(type="SmoothL1Loss", beta=0.11, loss_weight=0.5),
            loss_bbox_refine=dict(type="SmoothL1Loss", beta=0.11, loss_weight=1.0),
            transform_method="moment",
            train_cfg=ConfigDict(
                init=dict(
                    assigner=dict(type="PointAssigner", scale=4, pos_num=1),
                    allowed_border=-1,
                    pos_weight=-1,
                    debug=False,
                ),
                refine=dict(
                    assigner=dict(
                        type="MaxIoUAssigner",
                        pos_iou_thr=0.5,
                        neg_iou_thr=0.4,
                        min_pos_iou=0,
                        ignore_iof_thr=-1,
                    ),
                    allowed_border=-1,
                    pos_weight=-1,
                    debug=False,
                ),
            ),
            test_cfg=ConfigDict(
                nms_pre=nms_pre,
                min_bbox_size=0,
                score_thr=0.05,
                nms=dict(type="nms", iou_threshold=0.5),
                max_per_img=100,
            ),
        )
    )
    return neck, head


def randomize(neck: torch.nn.Module, head: torch.nn.Module) -> None:
    """Seeded weights: He-scaled convs, GN affine around (1, 0), init points spread over a few
    cells, class scores around the 0.05 threshold, `moment_transfer` (0.1, -0.2)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in (neck, head):
            for name, p in mod.named_parameters():
                if name == "moment_transfer":
                    p.copy_(torch.tensor([0.1, -0.2]))
                elif name.endswith("gn.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif p.ndim == 4:
                    fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                    std = (2.0 / fan_in) ** 0.5
                    if "pts_init_out" in name or "pts_refine_out" in name:
                        std *= 3.0
                    p.copy_(std * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        head.reppoints_cls_out.bias.add_(-2.0)


def metas() -> list[dict]:
    out = []
    for (h, w), sf in zip(IMG_SHAPES, SCALE_FACTORS, strict=True):
        pad = (int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32))
        out.append(
            dict(img_shape=(h, w), pad_shape=pad, batch_input_shape=CANVAS, scale_factor=sf[:2])
        )
    return out


def gt_instances(i: int, dtype=torch.float32) -> InstanceData:
    return InstanceData(
        bboxes=torch.tensor(GT[i], dtype=dtype), labels=torch.tensor(LABELS[i], dtype=torch.long)
    )


def run(neck, head, cs) -> tuple[list, list, tuple]:
    """Neck (with hooks on `fpn_convs.{l}.conv`) and head in training mode."""
    pre: list[torch.Tensor] = []
    hooks = [m.conv.register_forward_hook(lambda _m, _i, o: pre.append(o)) for m in neck.fpn_convs]
    outs = neck(cs)
    for h in hooks:
        h.remove()
    return pre, list(outs), head(list(outs))


def assignments(head, sizes, img_metas, pts_init) -> dict[str, np.ndarray]:
    """`gt_inds` of both stages over all points per image (mmdetection encoding), -1 where
    invalid; the refine proposals as `loss_by_feat` builds them."""
    centers, valid = head.get_points(sizes, img_metas, "cpu")
    rec = {"assign_init": [], "assign_refine": []}
    for i in range(len(img_metas)):
        flags = torch.cat(valid[i])
        pts = torch.cat(centers[i])
        boxes = []
        for lvl, stride in enumerate(STRIDES):
            shift = head.points2bbox(pts_init[lvl].detach()) * stride
            c = centers[i][lvl][:, :2]
            boxes.append(torch.cat([c, c], 1) + shift[i].permute(1, 2, 0).reshape(-1, 4))
        boxes = torch.cat(boxes)
        gt = gt_instances(i)
        for tag, assigner, priors in (
            ("assign_init", head.init_assigner, pts),
            ("assign_refine", head.refine_assigner, boxes),
        ):
            res = assigner.assign(InstanceData(priors=priors[flags]), gt)
            full = torch.full((pts.shape[0],), -1, dtype=torch.long)
            full[flags] = res.gt_inds
            rec[tag].append(full.numpy())
    return {k: np.stack(v) for k, v in rec.items()}


def refine_targets(head, cls_scores, pts_init, img_metas) -> dict[str, np.ndarray]:
    """Refine-stage labels and label weights over all points (`loss_by_feat`'s code)."""
    sizes = [c.shape[-2:] for c in cls_scores]
    centers, valid = head.get_points(sizes, img_metas, "cpu")
    bbox_list = []
    for i in range(len(img_metas)):
        bbox = []
        for lvl, stride in enumerate(STRIDES):
            shift = head.points2bbox(pts_init[lvl].detach()) * stride
            c = centers[i][lvl][:, :2]
            bbox.append(torch.cat([c, c], 1) + shift[i].permute(1, 2, 0).reshape(-1, 4))
        bbox_list.append(bbox)
    gts = [gt_instances(i) for i in range(len(img_metas))]
    labels, weights, *_ = head.get_targets(bbox_list, valid, gts, img_metas, stage="refine")
    return dict(
        refine_labels=torch.cat(labels, 1).numpy(),
        refine_label_weights=torch.cat(weights, 1).numpy(),
    )


def detections_211(head, cls_scores, pts_refine, img_metas, nms_pre: int) -> dict:
    """2.11 `RepPointsHead._get_bboxes_single(rescale=True)` from 3.3's parts."""
    sizes = [c.shape[-2:] for c in cls_scores]
    out = {}
    for i in range(len(img_metas)):
        boxes_l, scores_l = [], []
        h_img, w_img = img_metas[i]["img_shape"]
        for lvl, stride in enumerate(STRIDES):
            pts = head.prior_generator.single_level_grid_priors(sizes[lvl], lvl, device="cpu")
            pts = pts.to(cls_scores[lvl].dtype)
            scores = cls_scores[lvl][i].permute(1, 2, 0).reshape(-1, C).sigmoid()
            box = head.points2bbox(pts_refine[lvl][i : i + 1])[0].permute(1, 2, 0).reshape(-1, 4)
            if 0 < nms_pre < scores.shape[0]:
                _, idx = scores.max(1)[0].topk(nms_pre)
                scores, box, pts = scores[idx], box[idx], pts[idx]
            box = box * stride + torch.cat([pts[:, :2], pts[:, :2]], 1)
            box = torch.stack(
                [
                    box[:, 0].clamp(0, w_img),
                    box[:, 1].clamp(0, h_img),
                    box[:, 2].clamp(0, w_img),
                    box[:, 3].clamp(0, h_img),
                ],
                -1,
            )
            boxes_l.append(box)
            scores_l.append(scores)
        boxes = torch.cat(boxes_l)
        sf = img_metas[i]["scale_factor"]
        boxes = boxes / boxes.new_tensor([sf[0], sf[1], sf[0], sf[1]])
        scores = torch.cat(scores_l)
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], 1)
        dets, labels = multiclass_nms(boxes, scores, 0.05, dict(type="nms", iou_threshold=0.5), 100)
        out[f"det{nms_pre}_boxes_{i}"] = dets[:, :4].numpy()
        out[f"det{nms_pre}_scores_{i}"] = dets[:, 4].numpy()
        out[f"det{nms_pre}_labels_{i}"] = labels.numpy()
    return out


def write_detector_keys() -> None:
    """Keys and shapes of the real X101-DCN RepPoints detector (no weights, no download)."""
    import mmdet
    from mmengine.config import Config

    name = "reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py"
    cfg = Config.fromfile(
        os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/reppoints", name)
    )
    cfg.model.backbone.init_cfg = None
    sd = MODELS.build(cfg.model).state_dict()
    keys = list(sd)
    path = os.path.join(OUT, "reppoints_x101_dcn_keys.npz")
    np.savez_compressed(
        path,
        keys=np.array(keys),
        ndims=np.array([sd[k].ndim for k in keys]),
        shapes=np.array([d for k in keys for d in sd[k].shape]),
    )
    print(f"wrote {path}: {len(keys)} keys")


def main() -> None:
    register_all_modules()
    os.makedirs(OUT, exist_ok=True)
    write_detector_keys()
    torch.manual_seed(0)
    neck, head = build()
    randomize(neck, head)
    neck.train(), head.train()
    g = torch.Generator().manual_seed(1)
    cs = [
        torch.randn((3, c, CANVAS[0] // s, CANVAS[1] // s), generator=g)
        for c, s in zip(IN_CHANNELS, (4, 8, 16, 32), strict=True)
    ]
    rec: dict[str, np.ndarray] = {}
    for prefix, mod in (("neck.", neck), ("bbox_head.", head)):
        for k, v in mod.state_dict().items():
            rec["sd/" + prefix + k] = v.numpy()
    for i, c in enumerate(cs):
        rec[f"c{i}"] = c.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        pre, outs, (cls_scores, pts_init, pts_refine) = run(neck, head, cs)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    for lvl in range(len(STRIDES)):
        rec[f"pre{lvl}"], rec[f"p{lvl}"] = nhwc(pre[lvl]), nhwc(outs[lvl])
        rec[f"cls_{lvl}"] = nhwc(cls_scores[lvl])
        rec[f"init_{lvl}"] = nhwc(pts_init[lvl])
        rec[f"refine_{lvl}"] = nhwc(pts_refine[lvl])
    # float64 run of the same model
    neck64, head64 = build()
    neck64.load_state_dict(neck.state_dict()), head64.load_state_dict(head.state_dict())
    neck64.double().train(), head64.double().train()
    with torch.no_grad():
        pre64, _, (cls64, init64, ref64) = run(neck64, head64, [c.double() for c in cs])
    for lvl in range(len(STRIDES)):
        rec[f"pre{lvl}_f64"] = nhwc(pre64[lvl])
        rec[f"cls_{lvl}_f64"] = nhwc(cls64[lvl])
        rec[f"init_{lvl}_f64"] = nhwc(init64[lvl])
        rec[f"refine_{lvl}_f64"] = nhwc(ref64[lvl])

    gmax = max(len(x) for x in GT) + 1  # one padded slot in every image
    boxes = np.zeros((3, gmax, 4), np.float32)
    labels = np.full((3, gmax), -1, np.int32)
    valid = np.zeros((3, gmax), bool)
    for i, (b, lab) in enumerate(zip(GT, LABELS, strict=True)):
        boxes[i, : len(b)], labels[i, : len(b)], valid[i, : len(b)] = b, lab, True
    rec.update(
        gt_boxes=boxes,
        gt_labels=labels,
        gt_valid=valid,
        img_shape=np.array(IMG_SHAPES, np.int32),
        scale_factor=np.array(SCALE_FACTORS, np.float32),
    )
    img_metas = metas()
    sizes = [c.shape[-2:] for c in cls_scores]
    with torch.no_grad():
        rec.update(assignments(head, sizes, img_metas, pts_init))
        rec.update(refine_targets(head, cls_scores, pts_init, img_metas))
    gts = [gt_instances(i) for i in range(3)]
    losses = head.loss_by_feat(cls_scores, pts_init, pts_refine, gts, img_metas)
    losses = {k: float(sum(v)) for k, v in losses.items()}
    for k, v in losses.items():
        rec[k] = np.asarray(v)
    print("losses", losses)
    print("init positives per image", (rec["assign_init"] > 0).sum(1))
    print("refine positives per image", (rec["assign_refine"] > 0).sum(1))
    head.eval()
    with torch.no_grad():
        for nms_pre in (1000, 10):
            rec.update(detections_211(head, cls_scores, pts_refine, img_metas, nms_pre))
    print("detections per image", [len(rec[f"det1000_scores_{i}"]) for i in range(3)])
    print("detections per image, nms_pre 10", [len(rec[f"det10_scores_{i}"]) for i in range(3)])
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "reppoints.npz")
    np.savez_compressed(path, **rec)
    print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()

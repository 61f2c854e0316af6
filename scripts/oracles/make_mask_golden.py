"""Golden files for the mask data path, mask targets, FCNMaskHead, its loss and mask pasting,
from real mmdetection 3.3 (set to mmdetection 2.11's rules).

Run with the oracle venv (mmdetection 3.3.0, mmcv 2.1.0, CPU), from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_mask_golden.py

Writes `tests/golden/masks/masks.npz` (read by tests/test_ops_masks.py and
tests/test_mask_head.py; the tests never need mmdetection):

- data path, two images (a landscape 30x41 one flipped, a portrait 50x37 one not) with
  polygon (one of two parts) and RLE (compressed and uncompressed) annotations:
  `LoadAnnotations._poly2mask` (pycocotools at the json's size) -> `BitmapMasks.rescale`
  (Resize keep_ratio, mmcv `imrescale` nearest, scale (96, 64)) -> `.flip('horizontal')` ->
  `.pad` to the canvas (64x96 / 96x64): the full-canvas bitmaps `img{i}_bitmaps`, and
  `mask_target_single` (proposals clipped to the canvas, `crop_and_resize`: RoIAlign
  aligned, sampling 0, `>= 0.5`, mask_size 28) for given proposals: `img{i}_targets`;
- `FCNMaskHead` (4 conv3x3 + ReLU, deconv 2x2 stride 2 + ReLU, conv_logits 1x1; 8 channels,
  3 classes, 14x14 RoI features -> 28x28) with seeded weights (`head_state/*`, mmdetection
  names) on seeded RoI features: `head_feats`, `head_preds`;
- `loss_mask` (`CrossEntropyLoss(use_mask=True)`: BCE with logits on each RoI's GT class
  channel, mean over RoIs x 28 x 28) on `head_preds`, image 0's targets and `loss_labels`;
- pasting (`FCNMaskHead._predict_by_feat_single`, rescale=True, `mask_thr_binary=0.5`,
  `_do_paste_mask` on CPU, one box at a time) of `head_preds` for detections `paste_boxes`
  (resized-image pixels), `paste_labels`, scale factor `paste_scale` (w, h) and original
  size `paste_ori_hw`: `paste_masks [N, h, w] bool`.

mmdetection 3.3 vs 2.11 on these parts: `mask_target_single`, `crop_and_resize`,
`BitmapMasks.rescale/flip/pad`, `_poly2mask`, `FCNMaskHead.forward`, `mask_cross_entropy`
and `_do_paste_mask` are the same code. 3.3's `LoadAnnotations._process_masks` drops polygon
parts with fewer than 6 or an odd number of coordinates (2.11 with poly2mask=True passes them
to pycocotools); none here. Pasting: 2.11 `get_seg_masks(rescale=True)` divides the boxes by
the 4-value scale factor and pastes into `ori_shape`, as 3.3 does with its (w, h) factor
repeated; the threshold is `>= mask_thr_binary` in both.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from mmdet.structures.mask import BitmapMasks, mask_target
from mmengine.config import ConfigDict
from pycocotools import mask as mask_utils

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "masks")
SCALE = (96, 64)


def poly2mask(segm, h, w):
    """mmdetection `LoadAnnotations._poly2mask` (the same in 2.11 and 3.3)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle)


def images():
    rng = np.random.default_rng(0)
    star = []
    for k in range(9):
        r = 11 if k % 2 == 0 else 5
        a = 2 * np.pi * k / 9
        star += [float(20.3 + r * np.cos(a)), float(14.6 + r * np.sin(a))]
    blob = np.zeros((30, 41), np.uint8)
    blob[3:9, 28:39] = 1
    blob[5:12, 33:36] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    img0 = dict(
        hw=(30, 41),
        flip=True,
        segms=[
            [star, [2.2, 20.5, 9.8, 21.0, 8.1, 28.4, 1.0, 27.1]],  # two parts
            dict(size=rle["size"], counts=rle["counts"].decode()),  # compressed RLE
        ],
    )
    tri = np.zeros((50, 37), np.uint8)
    for y in range(8, 44):
        tri[y, 4 : 4 + (y - 8) // 2 + 1] = 1
    ucounts = []  # uncompressed RLE (column-major runs, starting with zeros)
    flat = tri.T.reshape(-1)
    cur, run = 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            ucounts.append(run)
            cur, run = int(v), 1
    ucounts.append(run)
    ell = []
    for t in np.linspace(0, 2 * np.pi, 20, endpoint=False):
        ell += [float(24.0 + 9.5 * np.cos(t)), float(30.0 + 15.2 * np.sin(t))]
    img1 = dict(
        hw=(50, 37),
        flip=False,
        segms=[dict(size=[50, 37], counts=ucounts), [ell]],
    )
    del rng
    return [img0, img1]


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    out: dict[str, np.ndarray] = {}
    for i, img in enumerate(images()):
        h, w = img["hw"]
        masks = BitmapMasks([poly2mask(s, h, w) for s in img["segms"]], h, w)
        masks = masks.rescale(SCALE)  # Resize(keep_ratio=True) -> mmcv.imrescale nearest
        rh, rw = masks.height, masks.width
        if img["flip"]:
            masks = masks.flip("horizontal")
        canvas = (64, 96) if w >= h else (96, 64)
        masks = masks.pad(canvas, pad_val=0)
        bm = masks.to_ndarray()
        boxes = []
        for m in bm:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        boxes = np.array(boxes, np.float32)
        props, inds = [], []
        for g, b in enumerate(boxes):
            bw, bh = b[2] - b[0], b[3] - b[1]
            for _ in range(3):
                props.append(b + rng.uniform(-0.25, 0.25, 4) * np.array([bw, bh, bw, bh]))
                inds.append(g)
        props.append(boxes[0] + np.array([-3.0, -4.0, 60.0, 50.0]))  # beyond the canvas
        inds.append(0)
        props = np.array(props, np.float32)
        inds = np.array(inds, np.int64)
        cfg = ConfigDict(mask_size=28)
        t = mask_target([torch.from_numpy(props)], [torch.from_numpy(inds)], [masks], cfg).numpy()
        for k, s in enumerate(img["segms"]):
            if isinstance(s, list):
                out[f"img{i}_segm{k}_parts"] = np.array([len(p) for p in s], np.int64)
                out[f"img{i}_segm{k}_poly"] = np.concatenate([np.asarray(p) for p in s])
            elif isinstance(s["counts"], list):
                out[f"img{i}_segm{k}_ucounts"] = np.array(s["counts"], np.int64)
            else:
                out[f"img{i}_segm{k}_rle"] = np.frombuffer(s["counts"].encode(), np.uint8)
        out[f"img{i}_hw"] = np.array([h, w])
        out[f"img{i}_resized_hw"] = np.array([rh, rw])
        out[f"img{i}_canvas"] = np.array(canvas)
        out[f"img{i}_flip"] = np.array(img["flip"])
        out[f"img{i}_bitmaps"] = bm.astype(np.uint8)
        out[f"img{i}_boxes"] = boxes
        out[f"img{i}_proposals"] = props
        out[f"img{i}_gt_inds"] = inds
        out[f"img{i}_targets"] = t.astype(np.uint8)

    head = FCNMaskHead(
        num_convs=4, roi_feat_size=14, in_channels=8, conv_out_channels=8, num_classes=3
    )
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1))
    n = len(out["img0_proposals"])
    feats = torch.randn(n, 8, 14, 14)
    with torch.no_grad():
        preds = head(feats)
        labels = torch.from_numpy(rng.integers(0, 3, n))
        targets = torch.from_numpy(out["img0_targets"]).float()
        loss = head.loss_mask(preds, targets, labels)
        boxes = torch.tensor(
            [[3.2, 4.7, 40.5, 30.1], [50.3, 8.8, 90.2, 60.4], [10.0, 10.0, 12.5, 11.0]]
            + [[20.1, 2.2, 70.7, 44.4]] * (n - 3)
        )
        plabels = torch.from_numpy(rng.integers(0, 3, n))
        scale = (1.37, 1.52)  # (w, h)
        ori = (45, 68)
        pasted = head._predict_by_feat_single(
            preds,
            boxes.clone(),
            plabels,
            dict(scale_factor=scale, ori_shape=ori),
            ConfigDict(mask_thr_binary=0.5),
            rescale=True,
        )
    out.update(
        {f"head_state/{k}": v.numpy() for k, v in head.state_dict().items()},
        head_feats=feats.numpy(),
        head_preds=preds.numpy(),
        loss_labels=labels.numpy(),
        loss_mask=np.array(float(loss)),
        paste_boxes=boxes.numpy(),
        paste_labels=plabels.numpy(),
        paste_scale=np.array(scale),
        paste_ori_hw=np.array(ori),
        paste_masks=pasted.numpy(),
    )
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "masks.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path)} bytes), loss_mask {float(loss):.6f}")


if __name__ == "__main__":
    main()

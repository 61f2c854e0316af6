"""segm metrics: `evaluation.coco_evaluate(iou_type='segm')` on a hand-made case equals
pycocotools' COCOeval run directly (results without `bbox`, as mmdetection 2.x passes them),
and `detections_to_coco` carries the RLEs of `data.masks.encode_rle`."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fgd_jax import evaluation
from fgd_jax.data.masks import decode_segmentation, encode_rle


def _gt(tmp_path):
    h, w = 40, 50
    anns, k = [], 0
    shapes = {
        1: [(1, [[5, 5, 25, 5, 25, 30, 5, 30]]), (2, [[30, 10, 45, 12, 40, 35]])],
        2: [(1, [[2, 2, 48, 2, 48, 6, 2, 6]]), (2, [[10, 10, 20, 10, 20, 38, 10, 38]])],
    }
    for img_id, objs in shapes.items():
        for cat, poly in objs:
            k += 1
            m = decode_segmentation(poly, (h, w))
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            anns.append(
                dict(id=k, image_id=img_id, category_id=cat, segmentation=poly, area=int(m.sum()),
                     bbox=bbox, iscrowd=0)
            )  # fmt: skip
    data = dict(
        images=[dict(id=i, file_name=f"{i}.png", height=h, width=w) for i in shapes],
        annotations=anns,
        categories=[dict(id=1, name="a"), dict(id=2, name="b")],
    )
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return str(path), h, w


def test_segm_metrics_equal_pycocotools(tmp_path):
    ann, h, w = _gt(tmp_path)
    rng = np.random.default_rng(0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
    masks, boxes, labels, scores = [], [], [], []
    for a in gt.dataset["annotations"]:  # perturbed GT masks plus a false positive
        m = gt.annToMask(a).astype(bool)
        m = np.roll(m, int(rng.integers(-2, 3)), axis=1)
        masks.append((a["image_id"], m))
        x, y, bw, bh = a["bbox"]
        boxes.append([x, y, x + bw, y + bh])
        labels.append(a["category_id"] - 1)
        scores.append(float(rng.uniform(0.5, 1)))
    fp = np.zeros((h, w), bool)
    fp[20:30, 30:40] = True
    masks.append((1, fp))
    boxes.append([30, 20, 40, 30])
    labels.append(0)
    scores.append(0.9)
    ids = np.array([1, 2, -1])
    per_img = {1: [], 2: []}
    for j, (img, _) in enumerate(masks):
        per_img[img].append(j)
    k = max(len(v) for v in per_img.values())
    B = np.zeros((3, k, 4), np.float32)
    S = np.zeros((3, k), np.float32)
    L = np.zeros((3, k), np.int32)
    V = np.zeros((3, k), bool)
    segms: list[list[dict]] = [[], [], []]
    for b, img in enumerate((1, 2)):
        for slot, j in enumerate(per_img[img]):
            B[b, slot], S[b, slot], L[b, slot], V[b, slot] = boxes[j], scores[j], labels[j], True
        segms[b] = encode_rle(np.stack([masks[j][1] for j in per_img[img]]))
    results = evaluation.detections_to_coco(ids, B, S, L, V, [1, 2], segms)
    assert len(results) == len(masks) and all("segmentation" in r for r in results)

    got = evaluation.coco_evaluate(gt, results, [1, 2], iou_type="segm")
    direct = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(direct), "segm")
        ev.params.imgIds = [1, 2]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = list(evaluation.METRIC_NAMES) + ["AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for name, v in zip(names, ev.stats, strict=True):
        assert got[name] == max(float(v), 0.0), name
    assert 0.0 < got["AP"] < 1.0 and set(got["per_class_AP"]) == {"a", "b"}
    bbox = evaluation.coco_evaluate(gt, results, [1, 2])
    assert bbox["AP"] != got["AP"]  # a different metric on the same results

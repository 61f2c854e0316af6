"""fgd_jax.evaluation against pycocotools used directly (the reference)."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fgd_jax import evaluation as E

CATS = [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "cat"}]


@pytest.fixture()
def gt_file(tmp_path):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(6):
        images.append({"id": 100 + i, "width": 200, "height": 150, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 120), rng.uniform(0, 80)
            w, h = rng.uniform(8, 70), rng.uniform(8, 60)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": int(rng.choice([3, 7, 11])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    p = tmp_path / "gt.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return p


def _padded_from_gt(gt_file, jitter, rng, k=8):
    coco = COCO(str(gt_file))
    cat_ids = sorted(coco.getCatIds())
    ids = sorted(coco.getImgIds()) + [-1]  # a padding example at the end
    B = len(ids)
    boxes = np.zeros((B, k, 4), np.float32)
    scores = np.zeros((B, k), np.float32)
    labels = np.zeros((B, k), np.int32)
    valid = np.zeros((B, k), bool)
    for b, img_id in enumerate(ids[:-1]):
        for j, a in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=img_id))):
            x, y, w, h = a["bbox"]
            d = rng.normal(0, jitter, 4) if jitter else np.zeros(4)
            boxes[b, j] = [x + d[0], y + d[1], x + w + d[2], y + h + d[3]]
            scores[b, j] = rng.uniform(0.1, 1.0)
            labels[b, j] = cat_ids.index(a["category_id"])
            valid[b, j] = True
    boxes[-1] = 5.0  # padding example: must be ignored
    valid[-1] = True
    return np.array(ids), boxes, scores, labels, valid, cat_ids


def test_perfect_detections_give_ap_one(gt_file):
    ids, boxes, scores, labels, valid, cat_ids = _padded_from_gt(
        gt_file, 0.0, np.random.default_rng(1)
    )
    res = E.detections_to_coco(ids, boxes, scores, labels, valid, cat_ids)
    assert all(r["image_id"] >= 0 for r in res)
    m = E.coco_evaluate(gt_file, res)
    # Small-area GT can be absent (APs = -1 in pycocotools -> reported as 0); AP must be 1.
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-6)
    assert set(m["per_class_AP"]) == {"car", "dog", "cat"}


def test_empty_detections_give_zero(gt_file):
    m = E.coco_evaluate(gt_file, [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0


def test_matches_pycocotools_directly(gt_file, tmp_path):
    ids, boxes, scores, labels, valid, cat_ids = _padded_from_gt(
        gt_file, 6.0, np.random.default_rng(2)
    )
    res = E.detections_to_coco(ids, boxes, scores, labels, valid, cat_ids)
    ours = E.coco_evaluate(gt_file, res)
    # Reference: pycocotools on the same detections written to a file.
    dt_file = E.write_json(tmp_path / "dt.json", res)
    gt = COCO(str(gt_file))
    ev = COCOeval(gt, gt.loadRes(dt_file), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert 0.05 < ours["AP"] < 0.95
    np.testing.assert_allclose(
        [ours[n] for n in E.METRIC_NAMES], np.maximum(ev.stats[:6], 0), rtol=0, atol=1e-12
    )


def test_missing_and_empty_annotation_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        E.coco_evaluate(tmp_path / "nope.json", [])
    p = tmp_path / "empty.json"
    p.write_text(
        json.dumps(
            {"images": [{"id": 1, "width": 5, "height": 5}], "annotations": [], "categories": CATS}
        )
    )
    with pytest.raises(ValueError, match="no annotations"):
        E.coco_evaluate(p, [])


def test_format_table():
    t = E.format_table({"teacher": {n: 0.5 for n in E.METRIC_NAMES}})
    assert "teacher" in t and "50.0" in t


def test_images_at_cap_counts_full_real_images_only():
    """An image fills the cap when every one of its K slots is valid; padding examples
    (image_id -1) never count."""
    from fgd_jax.evaluation import images_at_cap

    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
    assert images_at_cap(valid, np.array([5, 6, -1, 7])) == 1
    assert images_at_cap(valid, np.array([5, 6, 8, 7])) == 2

"""COCO reader against expectations computed directly with pycocotools (mmdetection 2.x
`CocoDataset` rules written out in the test) and clear errors for bad input."""

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from fgd_jax.data.coco import load_coco_records, read_coco_json
from tests.test_data_fixtures import write_coco_fixture


def _reference(ann_file, image_dir, train):
    """mmdetection 2.11 CocoDataset semantics from the pycocotools index, written plainly."""
    coco = COCO(ann_file)
    cat_ids = sorted(coco.getCatIds())  # contiguous labels by sorted category id
    out = {}
    for img_id in coco.getImgIds():
        info = coco.loadImgs([img_id])[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        if train:
            has_cat_ann = any(a["category_id"] in cat_ids for a in anns)
            if not has_cat_ann or min(info["height"], info["width"]) < 32:
                continue
        boxes, labels, ignore = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            ow = max(0, min(x + w, info["width"]) - max(x, 0))
            oh = max(0, min(y + h, info["height"]) - max(y, 0))
            if ow * oh == 0 or a["area"] <= 0 or w < 1 or h < 1:
                continue
            if a["category_id"] not in cat_ids:
                continue
            if a["iscrowd"]:
                ignore.append([x, y, x + w, y + h])
            else:
                boxes.append([x, y, x + w, y + h])
                labels.append(cat_ids.index(a["category_id"]))
        out[img_id] = (
            os.path.join(image_dir, info["file_name"]),
            (info["height"], info["width"]),
            np.array(boxes, np.float32).reshape(-1, 4),
            np.array(labels, np.int32),
            np.array(ignore, np.float32).reshape(-1, 4),
        )
    return out, cat_ids


@pytest.mark.parametrize("train", [True, False])
def test_records_match_pycocotools_reference(tmp_path, train):
    p = write_coco_fixture(tmp_path)
    recs = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=train)
    ref, cat_ids = _reference(p["ann_file"], p["image_dir"], train)
    # the fixture lists categories [7, 2, 40]: labels follow the sorted ids, not json order
    assert recs.label_to_cat_id == cat_ids == [2, 7, 40]
    assert recs.class_names == ["two", "seven", "forty"]
    assert [r["image_id"] for r in recs.records] == list(ref)  # json image order
    for r in recs.records:
        path, hw, boxes, labels, ignore = ref[r["image_id"]]
        assert r["file_name"] == path and tuple(r["orig_shape"]) == hw
        np.testing.assert_array_equal(r["boxes"], boxes)
        np.testing.assert_array_equal(r["labels"], labels)
        np.testing.assert_array_equal(r["ignore_boxes"], ignore)
        assert r["boxes"].dtype == np.float32 and r["labels"].dtype == np.int32


def test_filter_rules_spelled_out(tmp_path):
    p = write_coco_fixture(tmp_path)
    train = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=True)
    ids = [r["image_id"] for r in train.records]
    # empty (6) and tiny (8) dropped; crowd-only (7) kept with no GT, as mmdetection 2.x.
    assert ids == [11, 3, 25, 4, 5, 7]
    evals = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=False)
    assert [r["image_id"] for r in evals.records] == [11, 3, 25, 4, 5, 6, 7, 8]
    land = train.records[0]
    np.testing.assert_array_equal(land["boxes"], [[10, 5, 40.5, 25], [50, 30, 89, 59]])
    np.testing.assert_array_equal(land["labels"], [1, 2])  # cat 2 -> 0, 7 -> 1, 40 -> 2
    np.testing.assert_array_equal(land["ignore_boxes"], [[0, 0, 40, 40]])
    port = train.records[1]  # partly outside kept unclipped, fully outside dropped
    np.testing.assert_array_equal(port["boxes"], [[30, 70, 70, 110]])
    crowd_only = train.records[-1]
    assert crowd_only["boxes"].shape == (0, 4) and crowd_only["ignore_boxes"].shape == (1, 4)


def test_bad_input_errors_name_the_file(tmp_path):
    p = write_coco_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_records(tmp_path / "missing.json", p["image_dir"], True)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_coco_records(p["ann_file"], tmp_path / "no_such_dir", True)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.json.*empty"):
        read_coco_json(empty)
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{images: ")
    with pytest.raises(ValueError, match="notjson.json.*json"):
        read_coco_json(notjson)
    notcoco = tmp_path / "notcoco.json"
    notcoco.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="notcoco.json.*annotations"):
        read_coco_json(notcoco)
    os.remove(os.path.join(p["image_dir"], "port.png"))
    with pytest.raises(FileNotFoundError, match="port.png"):
        load_coco_records(p["ann_file"], p["image_dir"], True)
    recs = load_coco_records(p["ann_file"], p["image_dir"], True, on_bad_image="skip")
    assert recs.num_skipped == 1 and 3 not in [r["image_id"] for r in recs.records]

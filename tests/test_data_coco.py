"""COCO reader against expectations computed directly with pycocotools (mmdetection 2.x
`CocoDataset` rules written out in the test) and clear errors for bad input."""

import json
import os
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO

from fgd_jax.data.coco import load_coco_records, read_coco_json
from tests.test_data_fixtures import write_coco_fixture


def _reference(ann_file, image_dir, train):
    """mmdetection 2.11 CocoDataset semantics from the pycocotools index, written plainly."""
    coco = COCO(ann_file)
    # mmdetection 2.x CocoDataset.load_annotations, CLASSES being the json's names:
    # cat_ids = coco.get_cat_ids(cat_names=CLASSES); cat2label = {id: i} (pycocotools order)
    classes = [c["name"] for c in coco.dataset["categories"]]
    cat_ids = coco.getCatIds(catNms=classes)
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
    # the fixture lists categories [7, 2, 40]: labels follow that json order (mmdetection),
    # not the sorted ids
    assert recs.label_to_cat_id == cat_ids == [7, 2, 40]
    assert recs.class_names == ["seven", "two", "forty"]
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
    np.testing.assert_array_equal(land["labels"], [0, 2])  # cat 7 -> 0, 2 -> 1, 40 -> 2
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


def test_unknown_category_warns_once_per_id_with_count(tmp_path):
    """The fixture has one annotation of category 99 (not in `categories`); add two of 123."""
    p = write_coco_fixture(tmp_path)
    with open(p["ann_file"]) as f:
        data = json.load(f)
    extra = dict(image_id=3, category_id=123, bbox=[1, 1, 5, 5], area=25, iscrowd=0)
    data["annotations"] += [dict(extra, id=900), dict(extra, id=901)]
    with open(p["ann_file"], "w") as f:
        json.dump(data, f)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        recs = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=True)
    msgs = sorted(str(w.message) for w in got if "category_id" in str(w.message))
    assert len(msgs) == 2, msgs
    assert "instances.json: 1 annotation(s) with category_id 99," in msgs[0]
    assert "instances.json: 2 annotation(s) with category_id 123," in msgs[1]
    # still skipped: image 3 keeps its one in-image box only
    assert [r["labels"].tolist() for r in recs.records if r["image_id"] == 3] == [[1]]
    with pytest.raises(ValueError, match=r"instances.json.*123 \(2 annotations\).*99 \(1 "):
        load_coco_records(
            p["ann_file"], p["image_dir"], filter_empty=True, on_unknown_category="error"
        )


def test_unknown_category_option_from_the_data_config(tmp_path):
    from fgd_jax.config import coco_data
    from fgd_jax.data.sources import load_split

    write_coco_fixture(tmp_path)
    cfg = coco_data(root=str(tmp_path))
    cfg.train_ann, cfg.train_images = "annotations/instances.json", "images"
    assert cfg.on_unknown_category == "warn"
    with pytest.warns(UserWarning, match="category_id 99"):
        load_split(cfg, train=True)
    cfg.on_unknown_category = "error"
    with pytest.raises(ValueError, match="category ids that 'categories' does not list"):
        load_split(cfg, train=True)
    cfg.on_unknown_category = "ignore"
    with pytest.raises(ValueError, match="on_unknown_category must be one of"):
        load_split(cfg, train=True)


def test_repeated_category_id_refused(tmp_path):
    p = write_coco_fixture(tmp_path)
    with open(p["ann_file"]) as f:
        data = json.load(f)
    data["categories"].append({"id": 7, "name": "seven again"})
    with open(p["ann_file"], "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="repeats the category id 7"):
        read_coco_json(p["ann_file"])

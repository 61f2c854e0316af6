"""tfds `coco/2017` source: the example -> record conversion on hand-made example dicts
(reference: the COCO xywh box the normalized tfds box was made from), the same records as the
COCO source on the shared COCO fixture (converted the way tfds's `coco` builder converts a
json), and, where tensorflow_datasets is installed, the real `tfds.data_source` path under
`tfds.testing.mock_data`, down to batches identical to the COCO loader's."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from fgd_jax.config import coco_data
from fgd_jax.data import tfds_source
from fgd_jax.data.coco import load_coco_records
from fgd_jax.data.tfds_source import (
    COCO_CAT_IDS,
    image_size_from_bytes,
    records_from_source,
    tfds_example_to_record,
)
from fgd_jax.data.transforms import BadImageError
from tests.test_data_fixtures import write_coco_fixture


def _example(h=50, w=80, encoded=False):
    # COCO xywh boxes, normalized the way tfds does: (y / h, x / w, (y + bh) / h, (x + bw) / w).
    xywh = np.array([[10, 5, 30, 20], [40, 10, 0.5, 10], [0, 0, 80, 50], [60, 30, 20, 20]], float)
    norm = np.stack(
        [
            xywh[:, 1] / h,
            xywh[:, 0] / w,
            (xywh[:, 1] + xywh[:, 3]) / h,
            (xywh[:, 0] + xywh[:, 2]) / w,
        ],
        axis=1,
    ).astype(np.float32)
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if encoded:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        img = buf.getvalue()
    ex = {
        "image": img,
        "image/id": np.int64(139),
        "image/filename": b"000000000139.jpg",
        "objects": {
            "bbox": norm,
            "label": np.array([3, 4, 0, 79], np.int64),
            "is_crowd": np.array([False, False, True, False]),
            "area": np.array([600, 5, 4000, 400], np.int64),
            "id": np.arange(4, dtype=np.int64),
        },
    }
    return ex, xywh


@pytest.mark.parametrize("encoded", [False, True])
def test_example_to_record(encoded):
    ex, xywh = _example(encoded=encoded)
    rec = tfds_example_to_record(ex)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    assert rec["image_id"] == 139 and rec["orig_shape"] == (50, 80)
    # box 1 (w = 0.5 px) dropped, box 2 crowd -> ignore, boxes 0 and 3 kept
    np.testing.assert_allclose(rec["boxes"], xyxy[[0, 3]], atol=1e-4)
    np.testing.assert_array_equal(rec["labels"], [3, 79])
    np.testing.assert_allclose(rec["ignore_boxes"], xyxy[[2]], atol=1e-4)
    assert rec["boxes"].dtype == np.float32 and rec["labels"].dtype == np.int32
    if encoded:
        assert "image_bytes" in rec
    else:
        assert rec["image"].shape == (50, 80, 3)


def test_example_errors_and_empty():
    ex, _ = _example()
    del ex["objects"]
    with pytest.raises(ValueError, match="objects"):
        tfds_example_to_record(ex)
    ex, _ = _example()
    ex["objects"] = {k: v[:0] for k, v in ex["objects"].items()}
    ex["objects"]["bbox"] = np.zeros((0, 4), np.float32)
    rec = tfds_example_to_record(ex)
    assert rec["boxes"].shape == (0, 4) and rec["labels"].shape == (0,)


def test_cat_ids_are_coco_sorted_ids():
    assert len(COCO_CAT_IDS) == 80 and COCO_CAT_IDS == sorted(COCO_CAT_IDS)
    assert COCO_CAT_IDS[0] == 1 and COCO_CAT_IDS[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(COCO_CAT_IDS)


def test_image_size_from_header_only(tmp_path):
    p = write_coco_fixture(tmp_path)
    with open(os.path.join(p["image_dir"], "exif.jpg"), "rb") as f:
        jpg = f.read()
    assert image_size_from_bytes(jpg) == (70, 40)  # stored 40x70, EXIF orientation 6
    # a truncated file still has its header: the size comes without decoding any pixel
    assert image_size_from_bytes(jpg[: len(jpg) // 3]) == (70, 40)
    with open(os.path.join(p["image_dir"], "land.png"), "rb") as f:
        png = f.read()
    assert image_size_from_bytes(png[:100]) == (60, 90)
    with pytest.raises(BadImageError, match="image 9"):
        image_size_from_bytes(b"not an image", "image 9")


# ------------------------------------------------- the COCO fixture as tfds would store it
def _tfds_objects(anns, info, cat_ids):
    """tfds `coco` builder (`_generate_examples`): bbox normalized by the json's height and
    width (ymin, xmin, ymax, xmax), label = the category's position, is_crowd, int area.

    tfds's `BBoxFeature` only holds coordinates in [0, 1], so they are clipped (COCO's own
    boxes lie inside their images); categories unknown to the json cannot be stored."""
    h, w = info["height"], info["width"]
    objs = []
    for a in anns:
        if a["category_id"] not in cat_ids:
            continue
        x, y, bw, bh = a["bbox"]
        box = np.clip([y / h, x / w, (y + bh) / h, (x + bw) / w], 0.0, 1.0)
        objs.append(
            dict(
                id=a["id"],
                area=int(a["area"]),
                bbox=box,
                label=cat_ids.index(a["category_id"]),
                is_crowd=bool(a["iscrowd"]),
            )
        )
    return objs


def _fixture_as_tfds(p):
    """The fixture's images in json order as tfds builder inputs (image = the file's path)."""
    with open(p["ann_file"]) as f:
        data = json.load(f)
    # tfds' COCO builder numbers labels in the json's categories order, as mmdetection (and
    # as the COCO source); COCO 2017's json lists them by increasing id
    cat_ids = [c["id"] for c in data["categories"]]
    out = []
    for info in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        out.append(
            {
                "image": os.path.join(p["image_dir"], info["file_name"]),
                "image/filename": info["file_name"],
                "image/id": info["id"],
                "objects": _tfds_objects(anns, info, cat_ids),
            }
        )
    return out


def _as_skip_decoded(builder_input):
    """What `tfds.data_source(..., decoders={'image': SkipDecoding()})` returns for it."""
    with open(builder_input["image"], "rb") as f:
        data = f.read()
    objs = builder_input["objects"]
    return {
        "image": data,
        "image/filename": builder_input["image/filename"].encode(),
        "image/id": np.int64(builder_input["image/id"]),
        "objects": {
            "bbox": np.array([o["bbox"] for o in objs], np.float32).reshape(-1, 4),
            "label": np.array([o["label"] for o in objs], np.int64),
            "is_crowd": np.array([o["is_crowd"] for o in objs], bool),
            "area": np.array([o["area"] for o in objs], np.int64),
            "id": np.array([o["id"] for o in objs], np.int64),
        },
    }


def _assert_same_records(tf_recs, coco_recs):
    """tfds records == COCO records (COCO boxes clipped to the image, as tfds stores them)."""
    assert [r["image_id"] for r in tf_recs] == [r["image_id"] for r in coco_recs]
    for t, c in zip(tf_recs, coco_recs, strict=True):
        h, w = c["orig_shape"]
        assert tuple(t["orig_shape"]) == tuple(c["orig_shape"]), c["image_id"]
        for key in ("boxes", "ignore_boxes"):
            want = np.clip(c[key], 0, [w, h, w, h])
            assert t[key].shape == want.shape, (c["image_id"], key)
            np.testing.assert_allclose(t[key], want, atol=1e-3)
        np.testing.assert_array_equal(t["labels"], c["labels"])
        assert "image_bytes" not in t and "image" not in t and "tfds_ref" in t


@pytest.mark.parametrize("train", [True, False])
def test_records_from_source_match_coco_source(tmp_path, train):
    p = write_coco_fixture(tmp_path)
    coco = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=train)
    source = [_as_skip_decoded(e) for e in _fixture_as_tfds(p)]
    recs, skipped = records_from_source(source, train)
    assert skipped == 0
    _assert_same_records(recs, coco.records)
    if train:
        # filter_empty_gt as the COCO source: the crowd-only image 7 stays (no GT), the image
        # without annotations (6) and the one under 32 px (8) go
        assert [r["image_id"] for r in recs] == [11, 3, 25, 4, 5, 7]
        assert recs[-1]["boxes"].shape == (0, 4) and recs[-1]["ignore_boxes"].shape == (1, 4)
    else:
        assert len(recs) == 8
    assert sum(len(r["boxes"]) for r in recs) >= 6  # not vacuous: real boxes came through


def test_records_from_source_filter_empty_gt():
    """Training keeps an image with ANY annotation (as `coco.load_coco_records`), even when
    none of them is usable GT; it drops an image without annotations or under `min_size`."""
    degenerate, _ = _example(encoded=True)  # only the w = 0.5 px box and the zero-area one
    for k, v in degenerate["objects"].items():
        degenerate["objects"][k] = v[[1, 1]]
    degenerate["objects"]["area"] = np.array([5, 0], np.int64)
    crowd, _ = _example(encoded=True)
    crowd["objects"] = {k: v[[2]] for k, v in crowd["objects"].items()}
    empty, _ = _example(encoded=True)
    empty["objects"] = {k: v[:0] for k, v in empty["objects"].items()}
    small, _ = _example(h=31, w=80, encoded=True)
    for i, ex in enumerate([degenerate, crowd, empty, small]):
        ex["image/id"] = np.int64(i)
    recs, _ = records_from_source([degenerate, crowd, empty, small], train=True)
    assert [r["image_id"] for r in recs] == [0, 1]
    assert recs[0]["boxes"].shape == (0, 4) and recs[0]["ignore_boxes"].shape == (0, 4)
    assert recs[1]["boxes"].shape == (0, 4) and recs[1]["ignore_boxes"].shape == (1, 4)
    recs, _ = records_from_source([degenerate, crowd, empty, small], train=False)
    assert [r["image_id"] for r in recs] == [0, 1, 2, 3]
    recs, _ = records_from_source([degenerate, crowd, empty, small], train=True, min_size=31)
    assert [r["image_id"] for r in recs] == [0, 1, 3]


def test_records_from_source_bad_image(tmp_path):
    p = write_coco_fixture(tmp_path)
    source = [_as_skip_decoded(e) for e in _fixture_as_tfds(p)]
    source[1]["image"] = b"garbage"
    with pytest.raises(BadImageError, match="tfds image 3"):
        records_from_source(source, True)
    recs, skipped = records_from_source(source, True, on_bad_image="skip")
    assert skipped == 1 and [r["image_id"] for r in recs] == [11, 25, 4, 5, 7]


def test_ground_truth_from_examples_evaluates_as_the_json(tmp_path):
    """The val ground truth rebuilt from tfds examples (no json) gives COCOeval the same
    metrics as the fixture's json, for the same detections (reference: pycocotools on the
    json)."""
    from fgd_jax.evaluation import METRIC_NAMES, coco_evaluate

    p = write_coco_fixture(tmp_path)
    with open(p["ann_file"]) as f:
        data = json.load(f)
    # tfds stores boxes clipped to the image (the fixture has boxes reaching outside): the
    # reference json gets the same clipping (real COCO boxes lie inside their images)
    size = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    for a in data["annotations"]:
        w, h = size[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        x0, y0 = min(max(x, 0), w), min(max(y, 0), h)
        a["bbox"] = [x0, y0, min(max(x + bw, 0), w) - x0, min(max(y + bh, 0), h) - y0]
    clipped = tmp_path / "clipped.json"
    clipped.write_text(json.dumps(data))
    cats = data["categories"]  # label order, as `_fixture_as_tfds`
    cat_ids = [c["id"] for c in cats]
    gt: dict = {}
    recs, _ = records_from_source(
        [_as_skip_decoded(e) for e in _fixture_as_tfds(p)], train=False, ground_truth=gt
    )
    assert len(gt["images"]) == len(recs) == len(data["images"])
    names = [c["name"] for c in cats] + [f"unused{i}" for i in range(80 - len(cats))]
    coco = tfds_source.coco_from_entries(gt, names)
    # detections near every annotated box (crowd and tiny ones included), plus misses
    rng = np.random.default_rng(0)
    dets_json, dets_tfds = [], []
    known = [a for a in data["annotations"] if a["category_id"] in cat_ids]
    assert len(known) < len(data["annotations"])  # the fixture's unknown category is left out
    for a in known * 2:
        box = (np.asarray(a["bbox"], float) + rng.normal(0, 1.5, 4)).round(2)
        det = dict(image_id=a["image_id"], bbox=box.tolist(), score=float(rng.uniform()))
        label = cat_ids.index(a["category_id"])
        dets_json.append(det | {"category_id": a["category_id"]})
        dets_tfds.append(det | {"category_id": COCO_CAT_IDS[label]})
    ref = coco_evaluate(clipped, dets_json)
    got = coco_evaluate(coco, dets_tfds)
    assert ref["AP"] > 0.05 and ref["APs"] >= 0  # not vacuous
    for k in (*METRIC_NAMES, "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
    for c in cats:
        assert got["per_class_AP"][c["name"]] == pytest.approx(ref["per_class_AP"][c["name"]])


# --------------------------------------------------------- tensorflow_datasets, mocked
@pytest.fixture
def tfds_mock(tmp_path):
    """`tfds.testing.mock_data` whose `coco/2017` data source holds the COCO fixture, passed
    through the builder's real features: `serialize_example` then `deserialize_example_np`
    with the decoders the caller gives (what an ArrayRecord data source does)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    p = write_coco_fixture(tmp_path)
    inputs = _fixture_as_tfds(p)

    def as_data_source(builder, split, decoders=None, **kwargs):
        feats = builder.info.features
        return [
            feats.deserialize_example_np(feats.serialize_example(e), decoders=decoders)
            for e in inputs
        ]

    tfds_source._SOURCES.clear()
    tfds_source._RECORDS.clear()
    with tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source
    ):
        yield p
    tfds_source._SOURCES.clear()
    tfds_source._RECORDS.clear()


def test_tfds_mock_data_source(tfds_mock):
    from fgd_jax.data.pipeline import build_eval_loader, build_train_loader

    p = tfds_mock
    cfg = coco_data()
    cfg.source = "tfds"
    for train in (True, False):
        recs = tfds_source.load_tfds_records(cfg, train=train)
        coco = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=train)
        assert len(recs) == (6 if train else 8) and recs.label_to_cat_id == COCO_CAT_IDS
        assert recs.num_classes == 80 and len(recs.class_names) == 80
        _assert_same_records(recs.records, coco.records)
        for r in recs.records:  # the worker-side decode gives the size read from the header
            assert tfds_source.load_tfds_image(r).shape == (*r["orig_shape"], 3)
        if not train:  # the val ground truth comes with the records (eval needs no json)
            from fgd_jax.evaluation import val_ground_truth

            gt = val_ground_truth(cfg)
            assert gt is recs.coco and sorted(gt.getImgIds()) == sorted(coco.coco.getImgIds())
            known = [a for a in coco.coco.anns.values() if a["category_id"] in coco.label_to_cat_id]
            assert len(gt.anns) == len(known) > 0
    # loaders over the tfds records give the COCO loader's batches (same seed)
    # the fixture's small canvases (as tests/test_data_pipeline.py; that module needs torch)
    cfg = coco_data(p["root"], img_scale=(133, 80), canvases=((80, 144), (144, 80)), max_boxes=4)
    cfg.train_ann = cfg.val_ann = "annotations/instances.json"
    cfg.train_images = cfg.val_images = "images"
    cfg.max_ignore, cfg.num_workers = 2, 0
    tf_train = tfds_source.load_tfds_records(cfg, train=True)
    tf_eval = tfds_source.load_tfds_records(cfg, train=False)
    pairs = [
        (
            build_train_loader(cfg, 2, seed=1, process_index=0, process_count=1, records=tf_train),
            build_train_loader(cfg, 2, seed=1, process_index=0, process_count=1),
        ),
        (
            build_eval_loader(cfg, 4, process_index=0, process_count=1, records=tf_eval),
            build_eval_loader(cfg, 4, process_index=0, process_count=1),
        ),
    ]
    for tf_loader, coco_loader in pairs:
        assert len(tf_loader) == len(coco_loader)
        for _ in range(len(coco_loader)):
            a, b = next(tf_loader), next(coco_loader)
            assert a["valid"].any()
            for k in b:
                if k in ("boxes", "ignore_boxes", "scale_factor"):
                    np.testing.assert_allclose(a[k], b[k], atol=1e-3, err_msg=k)
                else:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

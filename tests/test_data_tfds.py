"""tfds `coco/2017` example -> record conversion on hand-made example dicts (reference: the
COCO xywh box the normalized tfds box was made from, and mmdetection's filtering rules);
the real tfds source runs under `tfds.testing.mock_data` only where tensorflow_datasets is
installed."""

import io

import numpy as np
import pytest
from PIL import Image

from fgd_jax.data.tfds_source import COCO_CAT_IDS, tfds_example_to_record


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


def test_tfds_mock_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    from fgd_jax.config import coco_data
    from fgd_jax.data.tfds_source import load_tfds_records

    cfg = coco_data()
    cfg.source = "tfds"
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        recs = load_tfds_records(cfg, train=False)
    assert len(recs) == 4
    for r in recs.records:
        assert r["boxes"].shape[1] == 4 and (r["labels"] < 80).all()

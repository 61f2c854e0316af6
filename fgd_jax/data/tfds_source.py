"""COCO 2017 through tensorflow-datasets (`coco/2017`), as the same records as `coco.py`.

tfds stores boxes normalized as (ymin, xmin, ymax, xmax), labels already contiguous 0..79 (in
COCO's sorted-id order, so `label_to_cat_id` is the sorted COCO ids) and `is_crowd` per object.
`tfds_example_to_record` is the pure numpy conversion (tested without TensorFlow); records
reference the example by (split, index) and the image is decoded in the pipeline workers from
`tfds.data_source` (random access, needs the ArrayRecord build of the dataset).

tensorflow-datasets is optional: `pip install .[tfds]`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from fgd_jax.data.coco import CocoRecords

# COCO 2017 category ids of tfds labels 0..79 (COCO's 80 ids in sorted order).
COCO_CAT_IDS = (
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27]
    + [28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52]
    + [53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78]
    + [79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "data.source='tfds' needs tensorflow-datasets and TensorFlow: pip install .[tfds]"
        ) from e
    return tfds


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def tfds_example_to_record(
    example: dict[str, Any], image_hw: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A tfds `coco/2017` example -> a record (see `fgd_jax.data.coco`), pure numpy.

    Args:
      example: dict with `image` ([H, W, 3] uint8, or encoded bytes when decoding was
        skipped), `image/id`, `objects` {`bbox` [n, 4] normalized (ymin, xmin, ymax, xmax),
        `label` [n], `is_crowd` [n], optionally `area`}.
      image_hw: (h, w) when `image` is encoded bytes (read from the header otherwise).
    Returns:
      record with `boxes` / `ignore_boxes` float32 xyxy pixels, `labels` int32, and
      `image` (array) or `image_bytes` (bytes). mmdetection's rules apply: boxes with w or h
      < 1 px or no overlap with the image are dropped, crowd boxes become ignore boxes.
    """
    for key in ("image", "image/id", "objects"):
        if key not in example:
            raise ValueError(f"tfds example lacks '{key}' (keys: {sorted(example)})")
    image = example["image"]
    rec: dict[str, Any] = {"image_id": int(_np(example["image/id"]))}
    encoded = isinstance(image, bytes | np.bytes_)
    if encoded or (hasattr(image, "dtype") and _np(image).dtype.kind in "SO"):
        data = bytes(_np(image).item()) if not isinstance(image, bytes) else image
        rec["image_bytes"] = data
        if image_hw is None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            image_hw = (h, w)
    else:
        arr = _np(image)
        if arr.ndim != 3:
            raise ValueError(f"tfds image {rec['image_id']}: expected [H, W, 3], got {arr.shape}")
        rec["image"] = arr.astype(np.uint8)
        image_hw = arr.shape[:2]
    h, w = int(image_hw[0]), int(image_hw[1])
    objs = example["objects"]
    bbox = _np(objs["bbox"]).astype(np.float64).reshape(-1, 4)
    labels = _np(objs["label"]).astype(np.int64).reshape(-1)
    crowd = _np(objs.get("is_crowd", np.zeros(len(labels), bool))).astype(bool).reshape(-1)
    if not (len(bbox) == len(labels) == len(crowd)):
        raise ValueError(f"tfds image {rec['image_id']}: objects have mismatched lengths")
    xyxy = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
    bw, bh = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    inter_w = np.maximum(0, np.minimum(xyxy[:, 2], w) - np.maximum(xyxy[:, 0], 0))
    inter_h = np.maximum(0, np.minimum(xyxy[:, 3], h) - np.maximum(xyxy[:, 1], 0))
    keep = (bw >= 1) & (bh >= 1) & (inter_w * inter_h > 0)
    if "area" in objs:
        keep &= _np(objs["area"]).reshape(-1) > 0
    rec.update(
        orig_shape=(h, w),
        boxes=xyxy[keep & ~crowd].astype(np.float32).reshape(-1, 4),
        labels=labels[keep & ~crowd].astype(np.int32),
        ignore_boxes=xyxy[keep & crowd].astype(np.float32).reshape(-1, 4),
    )
    return rec


@dataclasses.dataclass
class _TfdsRef:
    name: str
    split: str
    data_dir: str | None


_SOURCES: dict[tuple, Any] = {}


def _data_source(ref: _TfdsRef):
    key = (ref.name, ref.split, ref.data_dir)
    if key not in _SOURCES:
        _SOURCES[key] = _import_tfds().data_source(ref.name, split=ref.split, data_dir=ref.data_dir)
    return _SOURCES[key]


def load_tfds_image(record: dict) -> np.ndarray:
    """Decode the image of a record made by `load_tfds_records` (inside a worker)."""
    ref, index = record["tfds_ref"]
    ex = _data_source(ref)[int(index)]
    return np.asarray(ex["image"], dtype=np.uint8)


def load_tfds_records(data_cfg: Any, train: bool) -> CocoRecords:
    """Records of `coco/2017` train / validation from tensorflow-datasets.

    Reads the objects of every example once (images are not kept; the pipeline reads them
    again by index). Training drops images without objects or smaller than 32 px (mmdetection
    `_filter_imgs`). `data_cfg.get('tfds_data_dir')` selects the tfds data folder.
    """
    tfds = _import_tfds()
    name = data_cfg.get("tfds_name", "coco/2017")
    split = "train" if train else "validation"
    data_dir = data_cfg.get("tfds_data_dir", None)
    ref = _TfdsRef(name, split, data_dir)
    src = tfds.data_source(name, split=split, data_dir=data_dir)
    records = []
    for i in range(len(src)):
        rec = tfds_example_to_record(src[i])
        rec.pop("image", None)
        rec.pop("image_bytes", None)
        rec["tfds_ref"] = (ref, i)
        empty = len(rec["boxes"]) + len(rec["ignore_boxes"]) == 0
        if train and (empty or min(rec["orig_shape"]) < 32):
            continue
        records.append(rec)
    if not records:
        raise ValueError(f"tfds {name} {split}: no usable images")
    names = list(tfds.builder(name, data_dir=data_dir).info.features["objects"]["label"].names)
    return CocoRecords(records, list(COCO_CAT_IDS), names, None, f"tfds:{name}/{split}")

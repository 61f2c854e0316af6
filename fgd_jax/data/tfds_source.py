"""COCO 2017 through tensorflow-datasets (`coco/2017`), as the same records as `coco.py`.

tfds stores boxes normalized as (ymin, xmin, ymax, xmax), labels already contiguous 0..79 (in
COCO's sorted-id order, so `label_to_cat_id` is the sorted COCO ids) and `is_crowd` per object.
`tfds_example_to_record` and `records_from_source` are the pure numpy / PIL conversion (tested
without TensorFlow); they apply `fgd_jax.data.coco`'s rules, so both sources give the same
records. The data source is opened with `SkipDecoding` for the image: at startup only the
encoded header is read (for the size), and the pipeline workers decode the bytes with
`transforms.decode_image_bytes`, as the COCO source decodes files (EXIF orientation, RGB).
Random access needs the ArrayRecord build of the dataset (`tfds.data_source`).

tensorflow-datasets is optional: `pip install .[tfds]`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fgd_jax.config import complete_data_config
from fgd_jax.data import transforms as T
from fgd_jax.data.coco import CocoRecords

log = logging.getLogger(__name__)

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


def image_size_from_bytes(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """(h, w) in pixels of an encoded image as it decodes (EXIF orientation applied), read
    from the header only: no pixel is decoded.

    Raises:
      BadImageError: the bytes are not an image PIL can identify (the message names `name`).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            exif_bytes = im.info.get("exif")  # JPEG APP1 (parsed at open, with the header)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise T.BadImageError(f"{name}: cannot read image header ({type(e).__name__}: {e})") from e
    if exif_bytes:
        exif = Image.Exif()
        exif.load(exif_bytes)
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # transposed / rotated by 90 or 270 degrees
            h, w = w, h
    return int(h), int(w)


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
      `image` (array) or `image_bytes` (bytes). The rules of `coco.parse_annotations` apply:
      boxes with area <= 0, w or h < 1 px (up to float32 rounding of the normalized
      coordinates) or no overlap with the image are dropped, crowd boxes become ignore boxes.
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
            image_hw = image_size_from_bytes(data, f"tfds image {rec['image_id']}")
    else:
        arr = _np(image)
        if arr.ndim != 3:
            raise ValueError(f"tfds image {rec['image_id']}: expected [H, W, 3], got {arr.shape}")
        rec["image"] = arr.astype(np.uint8)
        image_hw = arr.shape[:2]
    h, w = int(image_hw[0]), int(image_hw[1])
    objs = example["objects"]
    xyxy, labels, crowd = _objects_in_pixels(objs, h, w, rec["image_id"])
    bw, bh = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    inter_w = np.maximum(0, np.minimum(xyxy[:, 2], w) - np.maximum(xyxy[:, 0], 0))
    inter_h = np.maximum(0, np.minimum(xyxy[:, 3], h) - np.maximum(xyxy[:, 1], 0))
    # tfds keeps coordinates as float32 fractions: allow their rounding (~1e-4 px) at w = 1
    keep = (bw >= 1 - _PX_EPS) & (bh >= 1 - _PX_EPS) & (inter_w * inter_h > 0)
    if "area" in objs:
        keep &= _np(objs["area"]).reshape(-1) > 0
    rec.update(
        orig_shape=(h, w),
        boxes=xyxy[keep & ~crowd].astype(np.float32).reshape(-1, 4),
        labels=labels[keep & ~crowd].astype(np.int32),
        ignore_boxes=xyxy[keep & crowd].astype(np.float32).reshape(-1, 4),
    )
    return rec


def _objects_in_pixels(
    objs: dict[str, Any], h: int, w: int, image_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tfds `objects` -> (boxes `[n, 4]` float64 xyxy pixels of an h x w image, labels `[n]`
    int64 (tfds's contiguous 0..79), crowd flags `[n]` bool). Raises ValueError when the
    object fields have different lengths."""
    bbox = _np(objs["bbox"]).astype(np.float64).reshape(-1, 4)
    labels = _np(objs["label"]).astype(np.int64).reshape(-1)
    crowd = _np(objs.get("is_crowd", np.zeros(len(labels), bool))).astype(bool).reshape(-1)
    if not (len(bbox) == len(labels) == len(crowd)):
        raise ValueError(f"tfds image {image_id}: objects have mismatched lengths")
    xyxy = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
    return xyxy, labels, crowd


_PX_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class _TfdsRef:
    name: str
    split: str
    data_dir: str | None


_SOURCES: dict[tuple, Any] = {}


def _data_source(ref: _TfdsRef):
    """`tfds.data_source` of `ref` with undecoded images (`image` is the encoded bytes)."""
    if ref not in _SOURCES:
        tfds = _import_tfds()
        _SOURCES[ref] = tfds.data_source(
            ref.name,
            split=ref.split,
            data_dir=ref.data_dir,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    return _SOURCES[ref]


def load_tfds_image(record: dict) -> np.ndarray:
    """Decode the image of a record made by `load_tfds_records` (inside a worker):
    `[H, W, 3] uint8` RGB, as `transforms.decode_image` (EXIF applied).

    Raises:
      BadImageError: the stored bytes do not decode (the message names split, index, id).
    """
    ref, index = record["tfds_ref"]
    ex = _data_source(ref)[int(index)]
    data = ex["image"]
    data = data if isinstance(data, bytes) else bytes(_np(data).item())
    name = f"tfds {ref.name} {ref.split}[{index}] (image id {record.get('image_id')})"
    return T.decode_image_bytes(data, name)


def records_from_source(
    source: Sequence[dict[str, Any]],
    train: bool,
    min_size: int = 32,
    on_bad_image: str = "error",
    ref: Any = None,
    ground_truth: dict[str, list] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Records of the examples of a tfds-like data source (`source[i]` -> example dict with
    the encoded image, see `tfds_example_to_record`), with `coco.load_coco_records`' rules.

    Training (`filter_empty_gt`, mmdetection `_filter_imgs`) keeps an example only if it has
    at least one object, crowd or degenerate ones included (such images are kept with no GT,
    as the COCO source does), and min(h, w) >= `min_size`; evaluation keeps every example.
    Images are not kept: a record holds `tfds_ref = (ref, index)` for `load_tfds_image`.

    `ground_truth`: when given (a dict), its `images` and `annotations` lists are filled with
    the COCO json entries of every kept example (`coco_entries`), all objects included, as
    the COCO json pycocotools evaluates against.

    Returns:
      (records, skipped): `skipped` counts examples whose image header is unreadable
      (`on_bad_image='skip'`; with 'error' they raise `BadImageError`).
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    records, skipped = [], 0
    for i in range(len(source)):
        ex = source[i]
        if train and len(_np(ex["objects"]["label"]).reshape(-1)) == 0:
            continue  # no annotation at all
        try:
            rec = tfds_example_to_record(ex)
        except T.BadImageError:
            if on_bad_image == "error":
                raise
            skipped += 1
            log.warning("skipping unreadable tfds example %d (%d skipped so far)", i, skipped)
            continue
        if train and min(rec["orig_shape"]) < min_size:
            continue
        if ground_truth is not None:
            image, anns = coco_entries(ex, rec["orig_shape"])
            ground_truth.setdefault("images", []).append(image)
            ground_truth.setdefault("annotations", []).extend(anns)
        rec.pop("image", None)
        rec.pop("image_bytes", None)
        rec["tfds_ref"] = (ref, i)
        records.append(rec)
    return records, skipped


def coco_entries(
    example: dict[str, Any], image_hw: tuple[int, int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The COCO json `image` entry and `annotations` of a tfds `coco/2017` example.

    Boxes back to COCO xywh pixels (from tfds's normalized (ymin, xmin, ymax, xmax): exact up
    to float32 rounding, ~1e-4 px), category ids through `COCO_CAT_IDS`, `iscrowd` from
    `is_crowd`, `area` from the example (the segmentation area pycocotools uses for the
    small/medium/large ranges; the box area when absent) and ids from `objects/id` (else
    `image_id * 1000 + k`). No object is dropped: COCOeval's own rules apply to them.
    """
    image_id = int(_np(example["image/id"]))
    h, w = int(image_hw[0]), int(image_hw[1])
    fname = example.get("image/filename", b"")
    fname = fname.decode() if isinstance(fname, bytes) else str(_np(fname).item() or "")
    objs = example["objects"]
    xyxy, labels, crowd = _objects_in_pixels(objs, h, w, image_id)
    x0, y0 = xyxy[:, 0], xyxy[:, 1]
    bw, bh = xyxy[:, 2] - x0, xyxy[:, 3] - y0
    area = _np(objs["area"]).astype(np.float64).reshape(-1) if "area" in objs else bw * bh
    ids = (
        _np(objs["id"]).astype(np.int64).reshape(-1)
        if "id" in objs
        else image_id * 1000 + np.arange(len(labels))
    )
    anns = [
        dict(
            id=int(ids[k]),
            image_id=image_id,
            category_id=int(COCO_CAT_IDS[int(labels[k])]),
            bbox=[float(x0[k]), float(y0[k]), float(bw[k]), float(bh[k])],
            area=float(area[k]),
            iscrowd=int(crowd[k]),
        )
        for k in range(len(labels))
    ]
    return dict(id=image_id, height=h, width=w, file_name=fname), anns


def coco_from_entries(ground_truth: dict[str, list], names: Sequence[str]):
    """A pycocotools `COCO` object from `coco_entries` lists and the 80 class names (no json
    file written)."""
    import contextlib

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(
        images=list(ground_truth.get("images", [])),
        annotations=list(ground_truth.get("annotations", [])),
        categories=[
            dict(id=int(c), name=str(n), supercategory="")
            for c, n in zip(COCO_CAT_IDS, names, strict=True)
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_tfds_records(data_cfg: Any, train: bool) -> CocoRecords:
    """Records of `coco/2017` train / validation from tensorflow-datasets.

    Reads the objects and the image header of every example once per process, without
    decoding images (the pipeline reads them again by index). The validation records carry
    the ground truth as a pycocotools `COCO` object (`.coco`, built from the examples), so
    evaluation needs no annotation json. Filtering as `records_from_source`, with
    `data_cfg.min_size` and `data_cfg.on_bad_image`; `data_cfg.tfds_name` / `tfds_data_dir`
    select the dataset and its tfds data folder ('' = the tfds default).
    """
    tfds = _import_tfds()
    data_cfg = complete_data_config(data_cfg)
    name = str(data_cfg.tfds_name)
    split = "train" if train else "validation"
    data_dir = data_cfg.tfds_data_dir or None
    ref = _TfdsRef(name, split, data_dir)
    min_size = int(data_cfg.min_size)
    on_bad = data_cfg.on_bad_image
    key = (ref, train, min_size, on_bad)
    if key in _RECORDS:
        return _RECORDS[key]
    gt: dict[str, list] | None = None if train else {}
    records, skipped = records_from_source(
        _data_source(ref), train, min_size=min_size, on_bad_image=on_bad, ref=ref, ground_truth=gt
    )
    if not records:
        raise ValueError(f"tfds {name} {split}: no usable images ({skipped} unreadable)")
    names = list(tfds.builder(name, data_dir=data_dir).info.features["objects"]["label"].names)
    coco = coco_from_entries(gt, names) if gt is not None else None
    out = CocoRecords(records, list(COCO_CAT_IDS), names, coco, f"tfds:{name}/{split}", skipped)
    _RECORDS[key] = out
    return out


# Records per (source, split, filtering), read once per process: evaluation asks for the
# val records twice (the loader, then the ground truth) and a training run evaluates often.
_RECORDS: dict[tuple, CocoRecords] = {}

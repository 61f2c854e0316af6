"""COCO-format annotations read with pycocotools, with mmdetection 2.x `CocoDataset` rules.

A *record* is a plain dict describing one image before any transform:
  file_name     str, path of the image file
  image_id      int, COCO image id
  orig_shape    (h, w) ints, from the json's height / width
  boxes         [n, 4] float32 xyxy, original pixels (COCO xywh -> x2 = x + w, no -1)
  labels        [n] int32, contiguous class index in [0, num_classes)
  ignore_boxes  [m, 4] float32 xyxy, the `iscrowd=1` boxes
  masks         (only when read `with_mask`) list of n checked COCO segmentations, one per
                box (polygon parts or RLE; `fgd_jax.data.masks`), decoded when batched

Rules (mmdetection 2.11 `CocoDataset.load_annotations / _parse_ann_info / _filter_imgs`):
  - labels: 0, 1, 2, ... in the order the categories are listed in the json's `categories`
    (not sorted by id); `label_to_cat_id[label]` maps back. mmdetection 2.x does
    `cat_ids = coco.get_cat_ids(cat_names=CLASSES)`, `cat2label = {id: i for i, id in
    enumerate(cat_ids)}`, and pycocotools' `getCatIds` filters the json's `categories` list
    without sorting it; with CLASSES = every name of the json (a custom dataset whose classes
    come from its json) label i is therefore the i-th listed category. On COCO 2017's json,
    listed by increasing id, this is also the sorted order. See `fgd_jax.data.classes`.
  - an annotation is dropped if `ignore` is set, it does not overlap the image, its `area` is
    <= 0 or its w or h < 1, or its category is unknown; survivors with `iscrowd` become ignore
    boxes. Unknown category ids warn once per id with their count (or, with
    `on_unknown_category='error'`, refuse the json): mmdetection drops them silently.
  - training (`filter_empty=True`) keeps an image only if it has at least one annotation of a
    known category (as mmdetection's `filter_empty_gt`: an image whose annotations are all
    crowd or degenerate is kept, with no GT) and min(h, w) >= `min_size` (32); evaluation keeps
    every image. `fgd_jax.data.tfds_source` applies the same rules.
  - `with_mask` (mmdetection `LoadAnnotations(with_mask=True)`): each kept GT carries its
    `segmentation` (crowd ones are ignore boxes and carry none, as mmdetection's `gt_masks`).
    A segmentation that is missing or malformed (`fgd_jax.data.masks.check_segmentation`)
    raises `BadMaskError` naming the file, image id and annotation id
    (`on_bad_mask='error'`), or with 'skip' loses its bad polygon parts, and the annotation is
    dropped when nothing usable remains; `CocoRecords.num_bad_masks` counts the annotations
    touched.
Images are in the json's order (`coco.getImgIds()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import warnings
from collections import Counter
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from fgd_jax.data.masks import ON_BAD_MASK, BadMaskError, check_segmentation

log = logging.getLogger(__name__)

ON_UNKNOWN_CATEGORY = ("warn", "error")


@dataclasses.dataclass
class CocoRecords:
    """The records of one split plus what evaluation needs to map back to COCO ids.

    Attributes:
      records: list of record dicts (see module docstring).
      label_to_cat_id: `[num_classes]` COCO category id of each contiguous label.
      class_names: category names in label order.
      coco: the pycocotools `COCO` object (ground truth for evaluation).
      ann_file: path of the annotation json.
      num_skipped: images dropped because their file is missing (`on_bad_image='skip'`).
      num_bad_masks: annotations whose segmentation was malformed (`on_bad_mask='skip'`):
        bad polygon parts dropped, or the whole annotation when nothing usable remained.
    """

    records: list[dict[str, Any]]
    label_to_cat_id: list[int]
    class_names: list[str]
    coco: COCO
    ann_file: str
    num_skipped: int = 0
    num_bad_masks: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.records)


def read_coco_json(ann_file: str | os.PathLike) -> COCO:
    """Load a COCO json into pycocotools with clear errors.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is empty, not json, or not COCO detection format (the message
        names the file and the problem).
    """
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    if os.path.getsize(ann_file) == 0:
        raise ValueError(f"{ann_file}: annotation file is empty")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not a valid json file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: not COCO format (top level is {type(data).__name__})")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{ann_file}: not COCO detection format, missing keys {missing}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: '{key}' must be a list")
    for i, img in enumerate(data["images"]):
        bad = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if bad:
            raise ValueError(f"{ann_file}: images[{i}] lacks {bad}")
    for i, ann in enumerate(data["annotations"]):
        bad = [k for k in ("image_id", "bbox", "category_id") if k not in ann]
        if bad:
            raise ValueError(f"{ann_file}: annotations[{i}] lacks {bad}")
        if len(ann["bbox"]) != 4:
            raise ValueError(f"{ann_file}: annotations[{i}] bbox must have 4 numbers")
    seen: set = set()
    for i, cat in enumerate(data["categories"]):
        if "id" not in cat or "name" not in cat:
            raise ValueError(f"{ann_file}: categories[{i}] lacks 'id' or 'name'")
        if cat["id"] in seen:
            raise ValueError(f"{ann_file}: categories[{i}] repeats the category id {cat['id']}")
        seen.add(cat["id"])
    if not data["categories"]:
        raise ValueError(f"{ann_file}: no categories")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def parse_annotations(
    anns: list[dict],
    img_hw: tuple[int, int],
    cat2label: dict[int, int],
    with_mask: bool = False,
    on_bad_mask: str = "error",
    where: str = "",
) -> tuple:
    """mmdetection `_parse_ann_info` for one image's annotations.

    Returns `(boxes [n, 4] float32 xyxy, labels [n] int32, ignore_boxes [m, 4] float32)`, and
    with `with_mask` also `masks` (n checked segmentations) and the number of annotations
    whose segmentation was malformed (`on_bad_mask='skip'`; 'error' raises `BadMaskError`,
    its message starting with `where` and naming the annotation id).
    """
    img_h, img_w = img_hw
    boxes, labels, ignore, masks, bad = [], [], [], [], 0
    for ann in anns:
        if ann.get("ignore", False):
            continue
        x1, y1, w, h = (float(v) for v in ann["bbox"])
        inter_w = max(0.0, min(x1 + w, img_w) - max(x1, 0.0))
        inter_h = max(0.0, min(y1 + h, img_h) - max(y1, 0.0))
        if inter_w * inter_h == 0:
            continue
        if ann.get("area", w * h) <= 0 or w < 1 or h < 1:
            continue
        if ann["category_id"] not in cat2label:
            continue
        box = [x1, y1, x1 + w, y1 + h]
        if ann.get("iscrowd", False):
            ignore.append(box)
            continue
        if with_mask:
            if "segmentation" not in ann:
                segm, problems = None, ["no 'segmentation'"]
            else:
                segm, problems = check_segmentation(ann["segmentation"], (img_h, img_w))
            if problems:
                msg = f"{where}annotation id {ann.get('id')}: {'; '.join(problems)}"
                if on_bad_mask != "skip":
                    raise BadMaskError(msg + " (data.on_bad_mask='skip' drops bad masks)")
                bad += 1
                log.warning("bad mask skipped: %s", msg)
            if segm is None:
                continue
            masks.append(segm)
        boxes.append(box)
        labels.append(cat2label[ann["category_id"]])
    out = (
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(labels, dtype=np.int32),
        np.array(ignore, dtype=np.float32).reshape(-1, 4),
    )
    return (*out, masks, bad) if with_mask else out


def check_unknown_categories(coco: COCO, ann_file: str, on_unknown_category: str) -> None:
    """Warn once per category id that annotations use but `categories` lacks, with its count
    and the file (`on_unknown_category='warn'`), or raise ValueError listing them ('error')."""
    if on_unknown_category not in ON_UNKNOWN_CATEGORY:
        raise ValueError(
            f"on_unknown_category must be one of {ON_UNKNOWN_CATEGORY}, got {on_unknown_category!r}"
        )
    known = set(coco.cats)
    counts = Counter(a["category_id"] for a in coco.anns.values() if a["category_id"] not in known)
    if not counts:
        return
    found = sorted(counts.items(), key=lambda kv: str(kv[0]))
    if on_unknown_category == "error":
        listed = ", ".join(f"{cid!r} ({n} annotations)" for cid, n in found)
        raise ValueError(
            f"{ann_file}: annotations use category ids that 'categories' does not list: "
            f"{listed}; fix the json, or set data.on_unknown_category='warn' to skip them"
        )
    for cid, n in found:
        warnings.warn(
            f"{ann_file}: {n} annotation(s) with category_id {cid!r}, which 'categories' does "
            "not list, are skipped (data.on_unknown_category='error' refuses them)",
            stacklevel=3,
        )


def load_coco_records(
    ann_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    filter_empty: bool,
    min_size: int = 32,
    keep_empty: bool = False,
    check_files: bool = True,
    on_bad_image: str = "error",
    on_unknown_category: str = "warn",
    with_mask: bool = False,
    on_bad_mask: str = "error",
) -> CocoRecords:
    """Read a COCO split into records (mmdetection 2.x rules, see the module docstring).

    Args:
      ann_file: the `instances_*.json`.
      image_dir: folder holding the images named by `file_name`.
      filter_empty: True for training (drop images without annotations and smaller than
        `min_size`), False for evaluation (keep every image).
      keep_empty: with `filter_empty`, keep images without annotations (mmdetection's
        `filter_empty_gt=False`, YOLOX); `min_size` still applies.
      check_files: verify every image file exists (a stat per image).
      on_bad_image: 'error' (raise) or 'skip' (drop the image with a warning and count it).
      on_unknown_category: 'warn' (skip annotations of category ids `categories` lacks, one
        warning per id with its count) or 'error' (raise); see `check_unknown_categories`.
      with_mask: records carry `masks` (the GTs' segmentations, checked; module docstring).
      on_bad_mask: 'error' (raise `BadMaskError`) or 'skip' (drop bad parts / annotations,
        counted in `num_bad_masks`), for malformed segmentations.
    Raises:
      FileNotFoundError: the annotation file, the image folder or (with 'error') an image file
        is missing.
      ValueError: the annotation file is empty or not COCO.
      BadMaskError: with `with_mask` and 'error', a malformed segmentation.
    """
    if on_bad_mask not in ON_BAD_MASK:
        raise ValueError(f"on_bad_mask must be one of {ON_BAD_MASK}, got {on_bad_mask!r}")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    ann_file, image_dir = os.fspath(ann_file), os.fspath(image_dir)
    coco = read_coco_json(ann_file)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir} (for {ann_file})")
    check_unknown_categories(coco, ann_file, on_unknown_category)
    # mmdetection 2.x: cat_ids = coco.get_cat_ids(cat_names=CLASSES) with CLASSES the json's
    # names; pycocotools' getCatIds keeps the json's `categories` order (it never sorts), so
    # labels follow the listed order. Ids are unique (read_coco_json), so this is that list.
    cat_ids = [c["id"] for c in coco.dataset["categories"]]
    cat2label = {cid: i for i, cid in enumerate(cat_ids)}
    names = [coco.cats[c]["name"] for c in cat_ids]

    ids_in_cat: set[int] = set()
    if filter_empty:
        ids_with_ann = {a["image_id"] for a in coco.anns.values()}
        for cid in cat_ids:
            ids_in_cat |= set(coco.catToImgs.get(cid, []))
        ids_in_cat &= ids_with_ann

    records, skipped, bad_masks = [], 0, 0
    for img_id in coco.getImgIds():
        info = coco.imgs[img_id]
        h, w = int(info["height"]), int(info["width"])
        no_gt = img_id not in ids_in_cat and not keep_empty
        if filter_empty and (no_gt or min(h, w) < min_size):
            continue
        path = os.path.join(image_dir, info["file_name"])
        if check_files and not os.path.isfile(path):
            if on_bad_image == "error":
                raise FileNotFoundError(f"{ann_file}: image id {img_id} file not found: {path}")
            skipped += 1
            log.warning("skipping missing image %s (%d skipped so far)", path, skipped)
            continue
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        parsed = parse_annotations(
            anns, (h, w), cat2label, with_mask, on_bad_mask, f"{ann_file}: image id {img_id}, "
        )
        rec = dict(
            file_name=path,
            image_id=int(img_id),
            orig_shape=(h, w),
            boxes=parsed[0],
            labels=parsed[1],
            ignore_boxes=parsed[2],
        )
        if with_mask:
            rec["masks"] = parsed[3]
            bad_masks += parsed[4]
        records.append(rec)
    if not records:
        raise ValueError(f"{ann_file}: no usable images (after filtering, {skipped} missing)")
    if bad_masks:
        warnings.warn(
            f"{ann_file}: {bad_masks} annotation(s) with malformed segmentations: bad polygon "
            "parts dropped, annotations without a usable part skipped (data.on_bad_mask)",
            stacklevel=2,
        )
    return CocoRecords(records, cat_ids, names, coco, ann_file, skipped, bad_masks)

"""One record -> one example with the per-image keys of the batch contract (docs/contracts.md).

mmdetection 2.x's train pipeline for one image: decode, `Resize(keep_ratio)`, `RandomFlip`,
`Normalize`, pad to the batch's canvas, GT boxes padded to `max_boxes` with validity masks.
With `mask_grid > 0` (mmdetection `LoadAnnotations(with_mask=True, poly2mask=True)`) each
GT's segmentation is decoded and kept as a `mask_grid x mask_grid` grid over its region
(`fgd_jax.data.masks.mask_grid`): keys `masks` and `mask_regions`.
Pure numpy; the randomness comes from the `np.random.Generator` the caller passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from fgd_jax.data import masks as MK
from fgd_jax.data import transforms as T

MULTISCALE_MODES = ("value", "range")
# kinds of boxes ('gt', 'ignore') whose overflow of max_boxes / max_ignore was already warned
# about in this process: one flag per kind, so one kind cannot hide the other's warning
_warned_overflow: set[str] = set()


def keep_largest(boxes: np.ndarray, n: int) -> np.ndarray:
    """Indices (in order) of the `n` largest boxes (stable on equal areas), all if <= n."""
    if len(boxes) <= n:
        return np.arange(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.sort(np.argsort(-area, kind="stable")[:n])


def pad_boxes(
    boxes: np.ndarray, labels: np.ndarray, n: int, name: str, kind: str = "gt"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad / truncate (keeping the largest) boxes to n: (boxes [n,4], labels [n], valid [n]).

    Warns once per process and `kind` ('gt': `max_boxes`, 'ignore': `max_ignore`)."""
    if len(boxes) > n:
        if kind not in _warned_overflow:
            _warned_overflow.add(kind)
            limit = "max_boxes" if kind == "gt" else "max_ignore"
            warnings.warn(
                f"{name}: {len(boxes)} {kind} boxes exceed {limit}={n}; keeping the {n} largest "
                f"(warned once for {kind} boxes)",
                stacklevel=2,
            )
        keep = keep_largest(boxes, n)
        boxes, labels = boxes[keep], labels[keep]
    k = len(boxes)
    ob = np.zeros((n, 4), np.float32)
    ol = np.full((n,), -1, np.int32)
    ov = np.zeros((n,), bool)
    ob[:k], ol[:k], ov[:k] = boxes, labels, True
    return ob, ol, ov


def mask_grids(
    record: dict,
    boxes: np.ndarray,
    resized_hw: tuple[int, int],
    canvas_hw: tuple[int, int],
    flipped: bool,
    n: int,
    grid: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The GT masks of a record as grids, padded like `pad_boxes` (same GTs kept).

    Args:
      record: with `masks` (one checked segmentation per GT) and `orig_shape`.
      boxes: `[g, 4]` the GT boxes after resize / flip (canvas pixels).
    Returns:
      `(masks [n, grid, grid] uint8, mask_regions [n, 4] float32)`, zeros where padded.
    """
    segms = record.get("masks")
    if segms is None:
        raise ValueError(
            f"record of image {record.get('image_id')} has no masks: read it with_mask "
            "(data.with_mask=True)"
        )
    out = np.zeros((n, grid, grid), np.uint8)
    regions = np.zeros((n, 4), np.float32)
    hw = tuple(int(v) for v in record["orig_shape"])
    for slot, i in enumerate(keep_largest(boxes, n)):
        bitmap = MK.decode_segmentation(segms[i], hw)
        out[slot], regions[slot] = MK.mask_grid(
            bitmap, boxes[i], resized_hw, canvas_hw, flipped, grid
        )
    return out, regions


def load_image(record: dict) -> np.ndarray:
    """Decode a record's image: `file_name` on disk, `image_bytes`, or a tfds reference."""
    if "file_name" in record:
        return T.decode_image(record["file_name"])
    if "image_bytes" in record:
        return T.decode_image_bytes(record["image_bytes"], str(record.get("image_id")))
    if "tfds_ref" in record:
        from fgd_jax.data.tfds_source import load_tfds_image

        return load_tfds_image(record)
    raise ValueError(f"record of image {record.get('image_id')} has no image source")


def sample_short_side(shorts: Sequence[int], mode: str, rng: np.random.Generator) -> int:
    """Multi-scale training: the short-side limit (px) of one image (mmdetection `Resize`).

    'value' (`multiscale_mode='value'`, mmdetection FCOS `img_scale=[(1333, 640),
    (1333, 800)]`): one of `shorts`, uniformly. 'range': an integer uniform in
    [min(shorts), max(shorts)], both ends included.
    """
    if mode == "value":
        return int(shorts[int(rng.integers(len(shorts)))])
    if mode == "range":
        return int(rng.integers(min(shorts), max(shorts) + 1))
    raise ValueError(f"multiscale_mode must be one of {MULTISCALE_MODES}, got {mode!r}")


def make_example(
    record: dict,
    canvas_hw: tuple[int, int],
    img_scale: Sequence[int],
    pixel_style: str,
    max_boxes: int,
    max_ignore: int,
    flip_prob: float = 0.0,
    rng: np.random.Generator | None = None,
    multiscale_short: Sequence[int] = (),
    multiscale_mode: str = "value",
    mask_grid: int = 0,
    pad_value: float = 0.0,
) -> dict[str, np.ndarray]:
    """One record -> one example with the per-image keys of the batch contract.

    Steps (mmdetection 2.x train pipeline): decode, `Resize(keep_ratio)` at `img_scale` (or,
    with `multiscale_short`, at (max(img_scale), short) with the short side drawn by
    `sample_short_side`), `RandomFlip`, `Normalize`, pad to `canvas_hw`. `mask_grid > 0`
    adds `masks [max_boxes, mask_grid, mask_grid] uint8` and `mask_regions [max_boxes, 4]`
    (`mask_grids`; the record needs `masks`). `pad_value`: the padding's value after
    normalization (`data.pad_value`: 0, or YOLOX's 114 on raw pixels).
    Raises `transforms.BadImageError` for unreadable images.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    img = load_image(record)
    oh, ow = img.shape[:2]
    if multiscale_short:
        short = sample_short_side(multiscale_short, multiscale_mode, rng)
        scale = (max(img_scale), short)
    else:
        scale = tuple(img_scale)
    nb = len(record["boxes"])
    all_boxes = np.concatenate([record["boxes"], record["ignore_boxes"]]).astype(np.float32)
    img, all_boxes, sf = T.resize_keep_ratio(img, all_boxes, scale, max_hw=canvas_hw)
    img, all_boxes, flipped = T.random_flip(img, all_boxes, flip_prob, rng)
    h, w = img.shape[:2]
    img = T.normalize_pad(img, canvas_hw, pixel_style, pad_value=pad_value)
    name = str(record.get("file_name", record.get("image_id")))
    boxes, labels, valid = pad_boxes(all_boxes[:nb], record["labels"], max_boxes, name, "gt")
    ign, _, ign_valid = pad_boxes(
        all_boxes[nb:], np.zeros(len(all_boxes) - nb, np.int32), max_ignore, name, "ignore"
    )
    ex = dict(
        image=img,
        boxes=boxes,
        labels=labels,
        valid=valid,
        ignore_boxes=ign,
        ignore_valid=ign_valid,
        img_shape=np.array([h, w], np.int32),
        pad_shape=np.array(canvas_hw, np.int32),
        scale_factor=sf.astype(np.float32),
        orig_shape=np.array([oh, ow], np.int32),
        flip=np.array(flipped),
        image_id=np.array(record["image_id"], np.int64),
    )
    if mask_grid > 0:
        ex["masks"], ex["mask_regions"] = mask_grids(
            record, all_boxes[:nb], (h, w), canvas_hw, flipped, max_boxes, mask_grid
        )
    return ex


def padding_example(
    canvas_hw, max_boxes: int, max_ignore: int, mask_grid: int = 0
) -> dict[str, np.ndarray]:
    """A filler example (last eval batch): zeros, nothing valid, image_id -1, scale 1."""
    hw = np.array(canvas_hw, np.int32)
    ex = dict(
        image=np.zeros((*canvas_hw, 3), np.float32),
        boxes=np.zeros((max_boxes, 4), np.float32),
        labels=np.full((max_boxes,), -1, np.int32),
        valid=np.zeros((max_boxes,), bool),
        ignore_boxes=np.zeros((max_ignore, 4), np.float32),
        ignore_valid=np.zeros((max_ignore,), bool),
        img_shape=hw.copy(),
        pad_shape=hw.copy(),
        scale_factor=np.ones((4,), np.float32),
        orig_shape=hw.copy(),
        flip=np.array(False),
        image_id=np.array(-1, np.int64),
    )
    if mask_grid > 0:
        ex["masks"] = np.zeros((max_boxes, mask_grid, mask_grid), np.uint8)
        ex["mask_regions"] = np.zeros((max_boxes, 4), np.float32)
    return ex

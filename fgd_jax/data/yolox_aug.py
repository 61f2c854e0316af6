"""YOLOX's training augmentations (mmdetection 2.x, `yolox_s_8x8_300e_coco`), numpy and PIL.

The pipeline of `make_yolox_example` is mmdetection 2.x's YOLOX `train_pipeline` under its
`MultiImageMixDataset` (`LoadImageFromFile` + `LoadAnnotations` per image, then):

  Mosaic(img_scale=(640, 640), center_ratio_range=(0.5, 1.5), pad_val=114)
  RandomAffine(scaling_ratio_range=(0.1, 2), border=(-320, -320); its defaults:
               max_rotate_degree=10, max_translate_ratio=0.1, max_shear_degree=2,
               border_val=114, skip_filter=True)
  MixUp(img_scale=(640, 640), ratio_range=(0.8, 1.6), flip_ratio=0.5, pad_val=114,
        max_iters=15, skip_filter=True)
  YOLOXHSVRandomAug(hue_delta=5, saturation_delta=30, value_delta=30)
  RandomFlip(flip_ratio=0.5)
  Resize(img_scale=(640, 640), keep_ratio=True)
  Pad(pad_to_square=True, pad_val=114)
  FilterAnnotations(min_gt_bbox_wh=(1, 1), keep_empty=False)

and no `Normalize`: the network sees raw 0-255 BGR pixels (`pixel_style='raw_bgr'`, padding
114). After `mode_switch_epoch` (mmdetection's `YOLOXModeSwitchHook`, the last 15 of 300
epochs) Mosaic, RandomAffine and MixUp are skipped and the example carries `use_l1=True`.

The rotation and shear are on: the mmdetection 2.x config sets neither, so `RandomAffine`'s
defaults (10 and 2 degrees) apply, as in the Megvii original (degrees=10, shear=2).

Differences from mmdetection, all numeric details of image resampling (boxes are exact):
  - cv2 `warpPerspective` (INTER_LINEAR, fixed-point weights in 1/32 steps, constant border)
    is `warp_affine` here: PIL's bilinear affine transform of the same map; pixel values can
    differ by a grey level, and the image's outermost pixels are not blended with the border.
  - cv2's uint8 BGR <-> HSV conversion (H in 180 steps) is PIL's here (H in 256 steps; the
    hue gain is rounded to those): S and V as cv2, hue 0.7 degrees apart at most.
  - the random numbers come from the example's `np.random.Generator` (a pure function of
    seed, epoch and slot), not from numpy's global state; the draws are in mmdetection's
    order, so the distributions are the same.
  - ignore (crowd) boxes are dropped: mmdetection's Mosaic does not move them and the YOLOX
    head does not read them.

Images are `[H, W, 3] uint8` RGB until the final conversion; boxes `[n, 4] float32` xyxy in
pixels of the current image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fgd_jax.data import transforms as T
from fgd_jax.data.example import load_image, pad_boxes

PAD = 114


@dataclasses.dataclass(frozen=True)
class YOLOXAugCfg:
    """Settings of `make_yolox_example` (mmdetection 2.x YOLOX values as defaults).

    `img_scale` (h, w): output size of Mosaic / MixUp and the Resize target.
    `mode_switch_epoch`: from this (0-based) epoch on, Mosaic, RandomAffine and MixUp are off
    and `use_l1` is on (-1: never)."""

    img_scale: tuple[int, int] = (640, 640)
    mosaic_center_range: tuple[float, float] = (0.5, 1.5)
    affine_scale: tuple[float, float] = (0.1, 2.0)
    affine_max_rotate: float = 10.0
    affine_max_shear: float = 2.0
    affine_max_translate: float = 0.1
    mixup_scale: tuple[float, float] = (0.8, 1.6)
    mixup_flip_ratio: float = 0.5
    mixup_max_iters: int = 15
    hsv_delta: tuple[int, int, int] = (5, 30, 30)
    flip_prob: float = 0.5
    min_gt_wh: tuple[float, float] = (1.0, 1.0)
    pad_value: float = PAD
    mode_switch_epoch: int = -1

    @classmethod
    def from_config(cls, d) -> YOLOXAugCfg:
        """From a `data.yolox` config section (a mapping; unknown keys refused)."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"data.yolox: unknown keys {sorted(unknown)} (known: {sorted(names)})")
        out = {}
        for k, v in d.items():
            out[k] = tuple(v) if isinstance(v, list | tuple) else v
        return cls(**out)


# ------------------------------------------------------------------------------ geometry
def find_inside(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
    """mmdet `find_inside_bboxes`: boxes overlapping the (h, w) image, strictly."""
    return (boxes[:, 0] < w) & (boxes[:, 2] > 0) & (boxes[:, 1] < h) & (boxes[:, 3] > 0)


def resize_to(img: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """mmcv `imresize(img, (w, h))` (cv2 INTER_LINEAR semantics, `transforms.resize_bilinear`)."""
    return T.resize_bilinear(img, (int(wh[1]), int(wh[0])))


def warp_affine(
    img: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], border_value: int = PAD
) -> np.ndarray:
    """cv2 `warpPerspective(img, matrix, (w, h), borderValue)` for an affine `matrix` [3, 3]
    (source -> destination pixels, pixel centres at integer coordinates, as cv2): PIL's
    bilinear affine transform (C speed) of the inverse map, shifted to PIL's half-pixel
    convention. Inside the image the two agree to rounding (a grey level); an output pixel
    whose sample point lies outside the source is `border_value` (cv2 blends the border value
    into the image's outermost pixels instead)."""
    h_out, w_out = int(out_hw[0]), int(out_hw[1])
    inv = np.linalg.inv(np.asarray(matrix, np.float64))
    a, b, c = inv[0]
    d, e, f = inv[1]
    # PIL samples at `inv @ (x + 0.5, y + 0.5) - 0.5`; cv2 at `inv @ (x, y)`
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    out = Image.fromarray(np.ascontiguousarray(img)).transform(
        (w_out, h_out), Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=(int(border_value),) * 3
    )
    return np.asarray(out, dtype=np.uint8)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """mmdet `RandomAffine`'s box rule: the 4 corners through `matrix`, their min / max."""
    n = len(boxes)
    if n == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    xs = boxes[:, [0, 0, 2, 2]].reshape(-1)
    ys = boxes[:, [1, 3, 3, 1]].reshape(-1)
    pts = np.asarray(matrix, np.float32) @ np.stack([xs, ys, np.ones_like(xs)])
    px = (pts[0] / pts[2]).reshape(n, 4)
    py = (pts[1] / pts[2]).reshape(n, 4)
    return np.stack([px.min(1), py.min(1), px.max(1), py.max(1)], 1).astype(np.float32)


def _clip(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes


# ------------------------------------------------------------------------------- mosaic
def _mosaic_place(
    loc: int, cx: int, cy: int, w: int, h: int, out_w: int, out_h: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(paste box on the mosaic, crop box of the image), both (x1, y1, x2, y2), for a `w` x `h`
    image in quadrant `loc` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) around the
    centre (cx, cy) of an `out_w` x `out_h` mosaic (mmdet `Mosaic._mosaic_combine`)."""
    left, top = loc in (0, 2), loc in (0, 1)
    if left:
        px1, px2 = max(cx - w, 0), cx
        cx1, cx2 = w - (px2 - px1), w
    else:
        px1, px2 = cx, min(cx + w, out_w)
        cx1, cx2 = 0, min(w, px2 - px1)
    if top:
        py1, py2 = max(cy - h, 0), cy
        cy1, cy2 = h - (py2 - py1), h
    else:
        py1, py2 = cy, min(cy + h, out_h)
        cy1, cy2 = 0, min(h, py2 - py1)
    return (px1, py1, px2, py2), (cx1, cy1, cx2, cy2)


def mosaic(
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    rng: np.random.Generator,
    img_scale: tuple[int, int] = (640, 640),
    center_range: tuple[float, float] = (0.5, 1.5),
    pad_value: int = PAD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mmdet 2.x `Mosaic`: 4 images, each resized to fit `img_scale` (h, w) keeping its ratio,
    around a random centre of a `2h x 2w` canvas filled with `pad_value`; boxes moved, clipped
    to the canvas and those outside dropped. Returns (image, boxes, labels)."""
    sh, sw = int(img_scale[0]), int(img_scale[1])
    out = np.full((2 * sh, 2 * sw, 3), pad_value, np.uint8)
    cx = int(rng.uniform(*center_range) * sw)
    cy = int(rng.uniform(*center_range) * sh)
    all_boxes, all_labels = [], []
    for loc, (img, b, lab) in enumerate(zip(images, boxes, labels, strict=True)):
        h, w = img.shape[:2]
        r = min(sh / h, sw / w)
        img = resize_to(img, (int(w * r), int(h * r)))
        h, w = img.shape[:2]
        (px1, py1, px2, py2), (cx1, cy1, cx2, cy2) = _mosaic_place(loc, cx, cy, w, h, 2 * sw,
                                                                   2 * sh)  # fmt: skip
        out[py1:py2, px1:px2] = img[cy1:cy2, cx1:cx2]
        b = np.asarray(b, np.float32).reshape(-1, 4) * np.float32(r)
        b = b + np.array([px1 - cx1, py1 - cy1, px1 - cx1, py1 - cy1], np.float32)
        all_boxes.append(b)
        all_labels.append(np.asarray(lab, np.int32).reshape(-1))
    b = _clip(np.concatenate(all_boxes), 2 * sh, 2 * sw)
    lab = np.concatenate(all_labels)
    keep = find_inside(b, 2 * sh, 2 * sw)
    return out, b[keep], lab[keep]


# ------------------------------------------------------------------------- random affine
def affine_matrix(
    rng: np.random.Generator,
    out_hw: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 1.5),
    max_rotate: float = 10.0,
    max_shear: float = 2.0,
    max_translate: float = 0.1,
) -> np.ndarray:
    """mmdet 2.x `RandomAffine`'s `translate @ shear @ rotation @ scaling` (float32 [3, 3],
    about the origin), drawn in its order: rotation, scale, shear x, shear y, translation x,
    y (translation `uniform(-t, t)` times the output width / height)."""
    h, w = out_hw
    a = math.radians(rng.uniform(-max_rotate, max_rotate))
    s = rng.uniform(*scale_range)
    shx = math.tan(math.radians(rng.uniform(-max_shear, max_shear)))
    shy = math.tan(math.radians(rng.uniform(-max_shear, max_shear)))
    tx = rng.uniform(-max_translate, max_translate) * w
    ty = rng.uniform(-max_translate, max_translate) * h
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    scale = np.diag([s, s, 1.0])
    shear = np.array([[1, shx, 0], [shy, 1, 0], [0, 0, 1]])
    trans = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    mats = [m.astype(np.float32) for m in (trans, shear, rot, scale)]
    return mats[0] @ mats[1] @ mats[2] @ mats[3]


def random_affine(
    img: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    border: tuple[int, int] = (-320, -320),
    pad_value: int = PAD,
    **matrix_kw,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mmdet 2.x `RandomAffine(skip_filter=True)`: output `(h + 2 * border[0], w + 2 *
    border[1])`, boxes through the corners, clipped, those outside dropped."""
    oh = img.shape[0] + 2 * int(border[0])
    ow = img.shape[1] + 2 * int(border[1])
    m = affine_matrix(rng, (oh, ow), **matrix_kw)
    out = warp_affine(img, m, (oh, ow), pad_value)
    b = _clip(transform_boxes(boxes, m), oh, ow)
    keep = find_inside(b, oh, ow)
    return out, b[keep], labels[keep]


# --------------------------------------------------------------------------------- mixup
def mixup(
    img: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    other: np.ndarray,
    other_boxes: np.ndarray,
    other_labels: np.ndarray,
    rng: np.random.Generator,
    img_scale: tuple[int, int] = (640, 640),
    scale_range: tuple[float, float] = (0.5, 1.5),
    flip_ratio: float = 0.5,
    pad_value: int = PAD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mmdet 2.x `MixUp(skip_filter=True)`: `other` resized to fit `img_scale` on a
    `pad_value` canvas, scaled by a random factor, maybe flipped, randomly cropped / zero
    padded to `img`'s size and blended 50 / 50 (truncated to uint8); boxes of both kept
    where inside. An `other` without boxes leaves everything unchanged."""
    if len(other_boxes) == 0:
        return img, boxes, labels
    jit = rng.uniform(*scale_range)
    flip = rng.uniform(0, 1) > flip_ratio
    sh, sw = img_scale
    canvas = np.full((sh, sw, 3), pad_value, np.uint8)
    r = min(sh / other.shape[0], sw / other.shape[1])
    small = resize_to(other, (int(other.shape[1] * r), int(other.shape[0] * r)))
    canvas[: small.shape[0], : small.shape[1]] = small
    r *= jit
    canvas = resize_to(canvas, (int(canvas.shape[1] * jit), int(canvas.shape[0] * jit)))
    if flip:
        canvas = canvas[:, ::-1]
    oh, ow = canvas.shape[:2]
    th, tw = img.shape[:2]
    padded = np.zeros((max(oh, th), max(ow, tw), 3), np.uint8)
    padded[:oh, :ow] = canvas
    y_off = int(rng.integers(0, padded.shape[0] - th)) if padded.shape[0] > th else 0
    x_off = int(rng.integers(0, padded.shape[1] - tw)) if padded.shape[1] > tw else 0
    crop = padded[y_off : y_off + th, x_off : x_off + tw]
    ob = _clip(np.asarray(other_boxes, np.float32).reshape(-1, 4) * np.float32(r), oh, ow)
    if flip:
        ob = np.stack([ow - ob[:, 2], ob[:, 1], ow - ob[:, 0], ob[:, 3]], 1)
    ob = _clip(ob - np.array([x_off, y_off, x_off, y_off], np.float32), th, tw)
    # 0.5 * a + 0.5 * b truncated to uint8 (mmdet), in integers: (a + b) >> 1
    mixed = ((img.astype(np.uint16) + crop.astype(np.uint16)) >> 1).astype(np.uint8)
    b = np.concatenate([boxes, ob]).astype(np.float32)
    lab = np.concatenate([labels, np.asarray(other_labels, np.int32)])
    keep = find_inside(b, th, tw)
    return mixed, b[keep], lab[keep]


# ----------------------------------------------------------------------------------- HSV
def hsv_shift(img: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Add `gains` (H, S, V in cv2's 8-bit units: H in 2-degree steps, S and V in [0, 255])
    to a uint8 RGB image's HSV: hue modulo the circle, S and V clipped. The conversions are
    PIL's (C speed; its 8-bit hue has 256 steps per circle, cv2's 180, so the hue gain is
    rounded to PIL's 1.4-degree steps); a round trip changes a pixel by at most a few levels
    either way."""
    hsv = np.array(Image.fromarray(np.ascontiguousarray(img)).convert("HSV"))
    hue_steps = int(round(float(gains[0]) * 256.0 / 180.0))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue_steps) % 256).astype(np.uint8)
    for k in (1, 2):
        if gains[k]:
            hsv[..., k] = np.clip(hsv[..., k].astype(np.int16) + int(gains[k]), 0, 255)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.uint8)


def hsv_jitter(
    img: np.ndarray, rng: np.random.Generator, delta: tuple[int, int, int] = (5, 30, 30)
) -> np.ndarray:
    """mmdet 2.x `YOLOXHSVRandomAug`: gains `uniform(-1, 1, 3) * delta`, each kept with
    probability 1/2 (`randint(0, 2, 3)`), truncated to int, added by `hsv_shift`."""
    gains = rng.uniform(-1, 1, 3) * np.asarray(delta, np.float64)
    gains = (gains * rng.integers(0, 2, 3)).astype(np.int16)
    if not gains.any():
        return img
    return hsv_shift(img, gains)


# ------------------------------------------------------------------------------- example
def _load(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = load_image(record)
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    return img, boxes, np.asarray(record["labels"], np.int32).reshape(-1)


def make_yolox_example(
    records: Sequence[dict],
    index: int,
    canvas_hw: tuple[int, int],
    max_boxes: int,
    max_ignore: int,
    cfg: YOLOXAugCfg,
    rng: np.random.Generator,
    epoch: int = 0,
    pixel_style: str = "raw_bgr",
) -> dict[str, np.ndarray]:
    """One training example of the YOLOX recipe (module docstring) for `records[index]`,
    the Mosaic / MixUp partners drawn uniformly from `records` (MixUp's among those with
    boxes, up to `mixup_max_iters` tries, as mmdetection). Keys of `example.make_example`
    plus `use_l1` (bool: `epoch >= cfg.mode_switch_epoch >= 0`). Raises
    `transforms.BadImageError` for an unreadable image (any of the mixed ones)."""
    switched = 0 <= cfg.mode_switch_epoch <= epoch
    record = records[index]
    img, boxes, labels = _load(record)
    oh, ow = img.shape[:2]
    if not switched:
        others = [_load(records[int(j)]) for j in rng.integers(0, len(records), 3)]
        img, boxes, labels = mosaic(
            [img] + [o[0] for o in others],
            [boxes] + [o[1] for o in others],
            [labels] + [o[2] for o in others],
            rng,
            cfg.img_scale,
            cfg.mosaic_center_range,
            int(cfg.pad_value),
        )
        img, boxes, labels = random_affine(
            img,
            boxes,
            labels,
            rng,
            border=(-cfg.img_scale[0] // 2, -cfg.img_scale[1] // 2),
            pad_value=int(cfg.pad_value),
            scale_range=cfg.affine_scale,
            max_rotate=cfg.affine_max_rotate,
            max_shear=cfg.affine_max_shear,
            max_translate=cfg.affine_max_translate,
        )
        for _ in range(cfg.mixup_max_iters):
            j = int(rng.integers(0, len(records)))
            if len(records[j]["boxes"]):
                break
        if len(records[j]["boxes"]):
            other = _load(records[j])
            img, boxes, labels = mixup(
                img, boxes, labels, *other, rng, cfg.img_scale, cfg.mixup_scale,
                cfg.mixup_flip_ratio, int(cfg.pad_value),
            )  # fmt: skip
    img = hsv_jitter(img, rng, cfg.hsv_delta)
    img, boxes, flipped = T.random_flip(img, boxes, cfg.flip_prob, rng)
    img, boxes, sf = T.resize_keep_ratio(img, boxes, tuple(cfg.img_scale), max_hw=canvas_hw)
    h, w = img.shape[:2]
    # FilterAnnotations(min_gt_bbox_wh, keep_empty=False): an image left without boxes stays
    keep = ((boxes[:, 2] - boxes[:, 0]) > cfg.min_gt_wh[0]) & (
        (boxes[:, 3] - boxes[:, 1]) > cfg.min_gt_wh[1]
    )
    boxes, labels = boxes[keep], labels[keep]
    name = str(record.get("file_name", record.get("image_id")))
    pb, pl, pv = pad_boxes(boxes, labels, max_boxes, name, "gt")
    return dict(
        image=T.normalize_pad(img, canvas_hw, pixel_style, pad_value=cfg.pad_value),
        boxes=pb,
        labels=pl,
        valid=pv,
        ignore_boxes=np.zeros((max_ignore, 4), np.float32),
        ignore_valid=np.zeros((max_ignore,), bool),
        img_shape=np.array([h, w], np.int32),
        pad_shape=np.array(canvas_hw, np.int32),
        scale_factor=sf.astype(np.float32),
        orig_shape=np.array([oh, ow], np.int32),
        flip=np.array(flipped),
        image_id=np.array(record["image_id"], np.int64),
        use_l1=np.array(switched),
    )

"""A deterministic synthetic detection dataset written as real COCO json + PNG images.

Two variants share the rendering (background, clutter, colours, occlusion, boxes):

- `basic` (the default; the tests' tiny runs): six classes of filled shapes, circle, square,
  triangle, ring, cross, diamond, axis-aligned except the triangle, 1-9 per image, extents
  log-uniform from `min_size` (8 px) to 60% of the short side. Pairs look alike at small
  scale (ring vs circle: a small hole; square vs diamond: a 45 degree turn).
- `lookalike`: ten classes in five look-alike pairs, circle / hexagon, ring / frame
  (round vs square hole), square / diamond, cross / x, triangle / star, each with a random
  pose within its class (rotation, aspect 0.8-1.25) and random class parameters (hole size,
  arm thickness, star depth), 2-10 per image, `min_size` 10 px. With `min_size=32` (mostly
  medium objects) it is the demo's data, where a deeper detector beats a shallower one
  trained the same way (R10 < R18 < R34: benchmarks/results/shapes_capacity_cpu.md).

Each image has a textured, noisy background (gradient + coarse blotches + stripes + pixel
noise) and distractor clutter that is no class (lines, polylines, thin ellipse outlines,
dots). Later shapes occlude earlier ones; a shape more than 60% covered is dropped and the box
of a visible one is the tight box of its visible pixels (COCO convention). Its `segmentation`
is the exact set of its visible pixels as compressed COCO RLE (pycocotools; `iscrowd=0`, as
mmdetection's `_poly2mask` decodes it), so Mask R-CNN can train and be evaluated on it.

`make_shapes_dataset(root, ...)` writes
  root/annotations/instances_{train,val}.json, root/{train,val}/{id:06d}.png, root/manifest.json
and is idempotent: a complete dataset with the same parameters (checked through the manifest)
is reused; anything else is regenerated (built in a temporary folder, then moved in place).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

_BASIC = ("circle", "square", "triangle", "ring", "cross", "diamond")
_LOOKALIKE = _BASIC + ("hexagon", "star", "frame", "x")
CLASS_NAMES = _BASIC  # the default variant's
# Non-contiguous COCO category ids, so the label mapping is exercised as on real COCO.
_CATEGORY_IDS = (1, 2, 3, 5, 7, 9, 10, 11, 13, 15)
MAX_COVERED = 0.6
MAX_SIZE_FRAC = 0.6
_VERSION = 2  # 2: annotations carry `segmentation` (RLE); images and boxes as in 1


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int | np.integer):
        return int(image_size), int(image_size)
    h, w = (int(v) for v in image_size)
    return h, w


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured noisy background `[h, w, 3] float32` in 0..255."""
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)[..., None] * rng.uniform(-60, 60, 3)
    coarse = rng.normal(0, 25, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    blot = np.stack(
        [
            np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BICUBIC))
            for c in range(3)
        ],
        axis=-1,
    )
    period = rng.uniform(4, 20)
    s_ang = rng.uniform(0, np.pi)
    stripes = np.sin((np.cos(s_ang) * xx + np.sin(s_ang) * yy) * (2 * np.pi / period))
    stripes = stripes[..., None] * rng.uniform(0, 14)
    img = base + grad + blot + stripes
    return img.astype(np.float32)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """Distractors that are no class: lines, polylines, ellipse outlines, dots."""
    for _ in range(int(rng.integers(2, 9))):
        kind = int(rng.integers(0, 4))
        col = _random_colour(rng)
        if kind == 0:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
            draw.line(pts, fill=col, width=int(rng.integers(1, 3)))
        elif kind == 1:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)]
            draw.line(pts, fill=col, width=1, joint="curve")
        elif kind == 2:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(3, w / 5), rng.uniform(1.5, h / 12)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=col, width=1)
        else:
            for _ in range(int(rng.integers(3, 12))):
                cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 2.0)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)


def _shape_mask(cls: int, cx: float, cy: float, size: float, h: int, w: int, rng) -> np.ndarray:
    """`basic` variant: boolean `[h, w]` mask of one shape of class `cls` with extent `size`
    px centred at c."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    r = size / 2.0
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls == 0:  # circle
        d.ellipse(box, fill=255)
    elif cls == 1:  # square (axis aligned)
        d.rectangle(box, fill=255)
    elif cls == 2:  # triangle, random rotation
        a0 = rng.uniform(0, 2 * np.pi)
        angles = [a0 + k * 2 * np.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        d.polygon(pts, fill=255)
    elif cls == 3:  # ring: a circle with a hole of 35-55% of the radius
        d.ellipse(box, fill=255)
        hr = r * rng.uniform(0.35, 0.55)
        d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=0)
    elif cls == 4:  # cross (plus) with thick arms
        t = r * rng.uniform(0.45, 0.7)
        d.rectangle([cx - r, cy - t / 2, cx + r, cy + t / 2], fill=255)
        d.rectangle([cx - t / 2, cy - r, cx + t / 2, cy + r], fill=255)
    else:  # diamond: square turned 45 degrees
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    return np.asarray(m) > 127


def _polygon(k: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """Regular k-gon `[k, 2]` in unit coordinates (y down), first vertex at angle `phase`."""
    a = phase + np.arange(k) * (2 * np.pi / k)
    return radius * np.stack([np.cos(a), np.sin(a)], axis=-1)


def _rect(half: float) -> np.ndarray:
    """Axis-aligned square `[4, 2]` of half side `half` (unit coordinates)."""
    return np.array([[-half, -half], [half, -half], [half, half], [-half, half]], np.float64)


def _plus(t: float) -> np.ndarray:
    """Plus sign `[12, 2]` with arms reaching 1 and arm thickness `t` (unit coordinates)."""
    a, b = t / 2, 1.0
    return np.array(
        [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
         [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]],
        np.float64,
    )  # fmt: skip


def _star(inner: float) -> np.ndarray:
    """Five-pointed star `[10, 2]`, tips at radius 1 (one pointing up), notches at `inner`."""
    a = -np.pi / 2 + np.arange(10) * (np.pi / 5)
    r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=-1)


# Rotation jitter (radians) of the classes whose orientation defines them (square vs diamond,
# plus vs x): small enough that the 45 degree difference stays visible.
_ORIENT_JITTER = np.deg2rad(12.0)


def _lookalike_polygons(
    cls: int, rng: np.random.Generator, jitter: bool
) -> tuple[list[tuple[np.ndarray, int]], float]:
    """`lookalike` class `cls` as polygons `[(points [k, 2] in unit coordinates, fill 255 or
    0)]` in drawing order (0 cuts a hole) and the rotation to apply (radians); extent ~1."""
    j = rng.uniform(-_ORIENT_JITTER, _ORIENT_JITTER) if jitter else 0.0
    free = rng.uniform(0, 2 * np.pi) if jitter else 0.0  # classes without a defining pose
    name = _LOOKALIKE[cls]
    if name == "circle":
        return [(_polygon(48), 255)], 0.0
    if name == "square":  # axis aligned (+- jitter)
        return [(_rect(0.85), 255)], j
    if name == "triangle":
        return [(_polygon(3), 255)], free
    if name == "ring":  # hole 35-55% of the radius
        return [(_polygon(48), 255), (_polygon(32, rng.uniform(0.35, 0.55)), 0)], 0.0
    if name == "cross":  # plus with thick arms (45-70% of the radius)
        return [(_plus(rng.uniform(0.45, 0.7)), 255)], j
    if name == "diamond":  # the square turned 45 degrees
        return [(_rect(0.85), 255)], np.pi / 4 + j
    if name == "hexagon":  # close to a circle when small
        return [(_polygon(6), 255)], free
    if name == "star":  # inner radius 45-60%
        return [(_star(rng.uniform(0.45, 0.6)), 255)], free
    if name == "frame":  # square outline, hole 45-65% of the side
        return [(_rect(0.85), 255), (_rect(0.85 * rng.uniform(0.45, 0.65)), 0)], j
    return [(_plus(rng.uniform(0.45, 0.7)), 255)], np.pi / 4 + j  # x: the cross turned 45


def _lookalike_mask(
    cls: int,
    cx: float,
    cy: float,
    size: float,
    h: int,
    w: int,
    rng: np.random.Generator,
    jitter: bool = True,
) -> np.ndarray:
    """`lookalike` variant: boolean `[h, w]` mask of one shape of class `cls`, extent about
    `size` px, centred at (cx, cy) px. `jitter`: random rotation (within the class's
    definition) and aspect ratio 0.8-1.25; off gives the canonical pose (tests use it)."""
    polys, angle = _lookalike_polygons(cls, rng, jitter)
    aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if jitter else 1.0
    r = size / 2.0
    scale = np.array([r * math.sqrt(aspect), r / math.sqrt(aspect)])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    for pts, fill in polys:
        xy = (pts * scale) @ rot.T + np.array([cx, cy])
        d.polygon([(float(x), float(y)) for x, y in xy], fill=fill)
    return np.asarray(m) > 127


@dataclasses.dataclass(frozen=True)
class _Variant:
    names: tuple[str, ...]  # class names in label order
    min_size: int  # default smallest shape extent, px
    per_image: tuple[int, int]  # shapes drawn per image, [lo, hi]
    mask: Callable[..., np.ndarray]  # (cls, cx, cy, size, h, w, rng) -> [h, w] bool


VARIANTS: dict[str, _Variant] = {
    "basic": _Variant(_BASIC, 8, (1, 9), _shape_mask),
    "lookalike": _Variant(_LOOKALIKE, 10, (2, 10), _lookalike_mask),
}


def _variant(variant: str) -> _Variant:
    if variant not in VARIANTS:
        raise ValueError(f"shapes variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def class_names(variant: str = "basic") -> tuple[str, ...]:
    """Class names of a variant, in label order."""
    return _variant(variant).names


def default_min_size(variant: str = "basic") -> int:
    """Smallest shape extent (px) a variant uses unless told otherwise."""
    return _variant(variant).min_size


def render_image(
    rng: np.random.Generator,
    h: int,
    w: int,
    top_class: int | None = None,
    min_size: float | None = None,
    variant: str = "basic",
    with_masks: bool = False,
) -> tuple[np.ndarray, list[tuple]]:
    """One image `[h, w, 3] uint8` of `variant` and its objects `(class, [x, y, bw, bh],
    area)`, with `with_masks` `(class, [x, y, bw, bh], area, visible [h, w] bool)`.

    `top_class` forces the class of the last (never occluded) shape; shape extents are
    log-uniform in [`min_size` (None: the variant's default), 60% of the short side] px.
    """
    spec = _variant(variant)
    min_size = spec.min_size if min_size is None else min_size
    lo, hi = spec.per_image
    img = _background(rng, h, w)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _draw_clutter(ImageDraw.Draw(canvas), rng, h, w)
    img = np.asarray(canvas).astype(np.float32)
    inst = np.full((h, w), -1, dtype=np.int32)
    n = int(rng.integers(lo, hi + 1))
    short = min(h, w)
    max_size = max(min_size + 1, MAX_SIZE_FRAC * short)
    shapes = []
    for k in range(n):
        cls = int(rng.integers(0, len(spec.names)))
        if k == n - 1 and top_class is not None:
            cls = int(top_class)
        size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
        cx = rng.uniform(size / 4, w - size / 4)
        cy = rng.uniform(size / 4, h - size / 4)
        mask = spec.mask(cls, cx, cy, size, h, w, rng)
        if not mask.any():
            continue
        col = np.array(_random_colour(rng), np.float32)
        # Shaded fill: a little gradient and noise so colour alone is not a perfect cue.
        img[mask] = col + rng.normal(0, 6, size=(int(mask.sum()), 3))
        inst[mask] = len(shapes)
        shapes.append((cls, mask))
    img += rng.normal(0, 5, size=img.shape)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    objects = []
    for i, (cls, mask) in enumerate(shapes):
        full = int(mask.sum())
        vis = inst == i
        nvis = int(vis.sum())
        if nvis < (1.0 - MAX_COVERED) * full or nvis == 0:
            continue
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        obj = (cls, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], nvis)
        objects.append((*obj, vis) if with_masks else obj)
    return out, objects


def encode_rle(mask: np.ndarray) -> dict:
    """`[h, w]` bool -> compressed COCO RLE `{'size': [h, w], 'counts': str}` (json-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode("ascii"))


def _manifest(
    num_train: int, num_val: int, hw: tuple[int, int], seed: int, min_size: int, variant: str
) -> dict:
    return dict(
        version=_VERSION,
        variant=variant,
        num_train=num_train,
        num_val=num_val,
        image_size=list(hw),
        seed=seed,
        min_size=min_size,
    )


def shapes_paths(root: str | os.PathLike) -> dict[str, str]:
    """Paths of a shapes dataset under `root` (annotation jsons and image folders)."""
    root = os.path.abspath(os.fspath(root))
    return dict(
        root=root,
        train_ann=os.path.join(root, "annotations", "instances_train.json"),
        train_images=os.path.join(root, "train"),
        val_ann=os.path.join(root, "annotations", "instances_val.json"),
        val_images=os.path.join(root, "val"),
        manifest=os.path.join(root, "manifest.json"),
    )


def _is_complete(root: str, manifest: dict) -> bool:
    p = shapes_paths(root)
    try:
        with open(p["manifest"]) as f:
            if json.load(f) != manifest:
                return False
    except (OSError, ValueError):
        return False
    for split, n in (("train", manifest["num_train"]), ("val", manifest["num_val"])):
        if not os.path.isfile(p[f"{split}_ann"]):
            return False
        if len([f for f in os.listdir(p[f"{split}_images"]) if f.endswith(".png")]) != n:
            return False
    return True


def _write_split(
    root: str, split: str, num: int, hw: tuple[int, int], seed: int, min_size: int, variant: str
) -> None:
    h, w = hw
    names = class_names(variant)
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    split_key = 0 if split == "train" else 1
    first_id = 1 if split == "train" else 1_000_001
    for i in range(num):
        rng = np.random.default_rng([seed, split_key, i])
        img, objects = render_image(
            rng,
            h,
            w,
            top_class=i % len(names),
            min_size=min_size,
            variant=variant,
            with_masks=True,
        )
        img_id = first_id + i
        name = f"{img_id:07d}.png"
        Image.fromarray(img).save(os.path.join(img_dir, name), compress_level=1)
        images.append(dict(id=img_id, file_name=name, height=h, width=w))
        for cls, bbox, area, vis in objects:
            anns.append(
                dict(
                    id=len(anns) + 1 + split_key * 10_000_000,
                    image_id=img_id,
                    category_id=_CATEGORY_IDS[cls],
                    bbox=bbox,
                    area=float(area),
                    iscrowd=0,
                    segmentation=encode_rle(vis),
                )
            )
    pairs = zip(_CATEGORY_IDS[: len(names)], names, strict=True)
    cats = [dict(id=c, name=n, supercategory="shape") for c, n in pairs]
    data = dict(
        info=dict(description=f"fgd_jax synthetic shapes ({variant})", version=str(_VERSION)),
        images=images,
        annotations=anns,
        categories=cats,
    )
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)


def make_shapes_dataset(
    root: str | os.PathLike,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int | Sequence[int] = 128,
    seed: int = 0,
    min_size: int | None = None,
    variant: str = "basic",
) -> dict[str, str]:
    """Generate (or reuse) the synthetic shapes dataset under `root`.

    Args:
      root: output folder.
      num_train, num_val: images per split (every class appears once `num` >= the number of
        classes).
      image_size: int (square) or (h, w), pixels.
      seed: the dataset is a pure function of (num_*, image_size, seed, min_size, variant).
      min_size: smallest shape extent, px (None: the variant's default, 8 or 10); larger
        values shift the mix from small to medium objects (COCO's 32 px boundary).
      variant: 'basic' (6 classes) or 'lookalike' (10 classes in look-alike pairs, posed).
    Returns:
      `shapes_paths(root)`: root, train_ann, train_images, val_ann, val_images, manifest.
    """
    hw = _size_hw(image_size)
    spec = _variant(variant)  # an unknown variant is refused before anything is written
    min_size = spec.min_size if min_size is None else int(min_size)
    if min_size < 2:
        raise ValueError(f"min_size={min_size}: shapes need at least 2 px")
    if min(hw) < 2 * min_size:
        raise ValueError(f"image_size {hw} too small (min side {2 * min_size} px)")
    root = os.path.abspath(os.fspath(root))
    manifest = _manifest(int(num_train), int(num_val), hw, int(seed), min_size, variant)
    if _is_complete(root, manifest):
        return shapes_paths(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_split(tmp, "train", int(num_train), hw, int(seed), min_size, variant)
        _write_split(tmp, "val", int(num_val), hw, int(seed), min_size, variant)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        if os.path.exists(root):
            if _is_complete(root, manifest):  # another process finished first
                return shapes_paths(root)
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, manifest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shapes_paths(root)

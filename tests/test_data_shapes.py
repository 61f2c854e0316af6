"""Synthetic shapes dataset: valid COCO (pycocotools), boxes inside images and matching the
drawn pixels (PIL), every class present, deterministic, idempotent, non-square sizes."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fgd_jax.data.shapes import (
    CLASS_NAMES,
    _lookalike_mask,
    class_names,
    make_shapes_dataset,
    render_image,
)


def _digest(paths):
    h = hashlib.sha256()
    for key in ("train_ann", "val_ann"):
        h.update(open(paths[key], "rb").read())
    for key in ("train_images", "val_images"):
        for f in sorted(os.listdir(paths[key])):
            h.update(open(os.path.join(paths[key], f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("s") / "ds"
    return make_shapes_dataset(root, num_train=18, num_val=8, image_size=(48, 80), seed=3)


def test_valid_coco_every_class_boxes_inside(small):
    for split, n in (("train", 18), ("val", 8)):
        coco = COCO(small[f"{split}_ann"])
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
        present = {a["category_id"] for a in coco.anns.values()}
        assert present == set(coco.getCatIds())
        for img_id in coco.getImgIds():
            info = coco.imgs[img_id]
            im = Image.open(os.path.join(small[f"{split}_images"], info["file_name"]))
            assert im.size == (info["width"], info["height"]) == (80, 48) and im.mode == "RGB"
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
                x, y, w, h = a["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 80 and y + h <= 48 and w >= 1 and h >= 1
                assert 0 < a["area"] <= w * h and a["iscrowd"] == 0


def test_boxes_are_tight_visible_extent():
    # render_image's boxes against the pixels that differ from a render without shapes is not
    # separable (shared rng), so check the invariant on the instance layout instead: the box
    # of each object contains exactly its visible pixel count `area`, at most w*h, and a box
    # side touches a visible pixel (tight box) -> area >= max(w, h).
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, objs = render_image(rng, 64, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        for cls, (_x, _y, w, h), area in objs:
            assert 0 <= cls < len(CLASS_NAMES)
            assert max(w, h) <= area <= w * h


def test_deterministic_and_idempotent(tmp_path, small):
    kw = dict(num_train=18, num_val=8, image_size=(48, 80))
    again = make_shapes_dataset(tmp_path / "b", seed=3, **kw)
    assert _digest(again) == _digest(small)
    other = make_shapes_dataset(tmp_path / "c", seed=4, **kw)
    assert _digest(other) != _digest(small)
    # reuse: an existing complete dataset is not rewritten
    stamp = os.path.getmtime(again["train_ann"])
    make_shapes_dataset(tmp_path / "b", seed=3, **kw)
    assert os.path.getmtime(again["train_ann"]) == stamp
    # different parameters regenerate in place, manifest records them
    p = make_shapes_dataset(tmp_path / "b", num_train=6, num_val=2, image_size=32, seed=3)
    assert json.load(open(p["manifest"]))["num_train"] == 6
    assert len(os.listdir(p["train_images"])) == 6
    # an incomplete dataset (an image deleted) is regenerated
    os.remove(os.path.join(p["train_images"], sorted(os.listdir(p["train_images"]))[0]))
    p = make_shapes_dataset(tmp_path / "b", num_train=6, num_val=2, image_size=32, seed=3)
    assert len(os.listdir(p["train_images"])) == 6


def test_scale_range_and_occlusion_statistics(tmp_path):
    p = make_shapes_dataset(tmp_path / "d", num_train=60, num_val=1, image_size=128, seed=0)
    coco = COCO(p["train_ann"])
    sides = np.array([max(a["bbox"][2:]) for a in coco.anns.values()])
    assert sides.min() <= 10 and sides.max() >= 0.45 * 128  # ~8 px to ~60% of the image
    fill = np.array([a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in coco.anns.values()])
    assert (fill < 0.5).any()  # some shapes are partly covered / hollow (ring, cross)
    per_img = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert max(per_img) >= 5 and min(per_img) >= 1


def test_min_size_shifts_small_to_medium_objects(tmp_path):
    kw = dict(num_train=40, num_val=1, image_size=96, seed=0)
    small = COCO(make_shapes_dataset(tmp_path / "s", **kw)["train_ann"])
    big = COCO(make_shapes_dataset(tmp_path / "m", min_size=24, **kw)["train_ann"])
    extent = [np.array([max(a["bbox"][2:]) for a in c.anns.values()]) for c in (small, big)]
    # visible boxes of occluded shapes may be smaller than the drawn extent, most are not
    assert np.median(extent[1]) > np.median(extent[0]) + 5
    assert np.mean(extent[1] >= 20) > 0.9 and extent[0].min() <= 10


def test_too_small_image_size(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        make_shapes_dataset(tmp_path / "e", 2, 2, image_size=8)
    with pytest.raises(ValueError, match="too small"):
        make_shapes_dataset(tmp_path / "e", 2, 2, image_size=40, min_size=24)
    with pytest.raises(ValueError, match="at least 2 px"):
        make_shapes_dataset(tmp_path / "e", 2, 2, image_size=40, min_size=1)


def _plus_regions(a, b, r):
    """Pixels surely inside / outside a plus sign on axes (a, b) whose arms reach r, with
    the arm thickness drawn in 45-70% of r (boundary pixels, <= 1 px, are in neither)."""

    def arm(p, q):
        return (np.abs(p) < r - 1) & (np.abs(q) < 0.225 * r - 1)

    far = np.maximum(np.abs(a), np.abs(b)) > r + 1
    return arm(a, b) | arm(b, a), far | ((np.abs(a) > 0.35 * r + 1) & (np.abs(b) > 0.35 * r + 1))


@pytest.mark.parametrize("cls", range(6))
def test_shape_masks_match_analytic_shapes(cls):
    # Reference: the analytic region of each class on pixel centres; PIL rasterisation may
    # differ on boundary pixels only (<= 1 px from the outline).
    from fgd_jax.data.shapes import _shape_mask

    h = w = 64
    cx, cy, size = 31.5, 30.5, 40.0
    r = size / 2
    m = _shape_mask(cls, cx, cy, size, h, w, np.random.default_rng(0))
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dx, dy = xx - cx, yy - cy
    d = np.hypot(dx, dy)
    if cls == 0:
        inside, outside = d < r - 1, d > r + 1
    elif cls == 1:
        inside = (np.abs(dx) < r - 1) & (np.abs(dy) < r - 1)
        outside = (np.abs(dx) > r + 1) | (np.abs(dy) > r + 1)
    elif cls == 3:  # ring: hole radius 35-55% of r, so the centre is empty
        inside, outside = (d < r - 1) & (d > 0.55 * r + 1), (d > r + 1) | (d < 0.35 * r - 1)
    elif cls == 5:
        inside, outside = np.abs(dx) + np.abs(dy) < r - 1.5, np.abs(dx) + np.abs(dy) > r + 1.5
    elif cls == 4:
        inside, outside = _plus_regions(dx, dy, r)
    else:  # triangle inscribed in the circle of radius r: inside the inner circle r/2
        inside, outside = d < r / 2 - 1, d > r + 1
    assert m[inside].all() and not m[outside].any()


# ---------------------------------------------------------------------- lookalike variant
LOOKALIKE = class_names("lookalike")


def test_lookalike_dataset_classes_ids_and_counts(tmp_path):
    p = make_shapes_dataset(tmp_path / "l", 20, 2, image_size=64, seed=1, variant="lookalike")
    coco = COCO(p["train_ann"])
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == list(LOOKALIKE)
    assert [c["id"] for c in cats] == [1, 2, 3, 5, 7, 9, 10, 11, 13, 15]  # non-contiguous
    assert {a["category_id"] for a in coco.anns.values()} == set(coco.getCatIds())
    # 2-10 shapes drawn per image (occluded ones dropped), extents from 10 px
    per_img = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert max(per_img) >= 6 and min(per_img) >= 1
    manifest = json.load(open(p["manifest"]))
    assert manifest["variant"] == "lookalike" and manifest["min_size"] == 10
    # the variant is part of the dataset's identity: same arguments, basic -> regenerated
    b = make_shapes_dataset(tmp_path / "l", 20, 2, image_size=64, seed=1)
    assert len(COCO(b["train_ann"]).getCatIds()) == len(CLASS_NAMES)
    with pytest.raises(ValueError, match="shapes variant 'hard'"):
        make_shapes_dataset(tmp_path / "x", 2, 2, image_size=64, variant="hard")


@pytest.mark.parametrize("cls", range(len(LOOKALIKE)))
def test_lookalike_masks_match_analytic_shapes(cls):
    # Canonical pose (no rotation or aspect jitter) against the analytic region of each class
    # on pixel centres; PIL may differ on boundary pixels only. Class parameters drawn at
    # random (hole size, arm thickness, star depth) are covered over their whole range.
    h = w = 64
    cx, cy, size = 31.5, 30.5, 40.0
    r = size / 2
    m = _lookalike_mask(cls, cx, cy, size, h, w, np.random.default_rng(cls), jitter=False)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dx, dy = xx - cx, yy - cy
    d = np.hypot(dx, dy)
    cheb = np.maximum(np.abs(dx), np.abs(dy))
    circ_in = r * np.cos(np.pi / 48) - 1  # the 48-gon's apothem

    name = LOOKALIKE[cls]
    if name == "circle":
        inside, outside = d < circ_in, d > r + 1
    elif name == "square":  # half side 0.85 r
        inside, outside = cheb < 0.85 * r - 1, cheb > 0.85 * r + 1
    elif name == "triangle":  # inscribed in the circle of radius r: holds the inner circle
        inside, outside = d < r / 2 - 1, d > r + 1
    elif name == "ring":  # hole radius 35-55% of r
        inside = (d < circ_in) & (d > 0.55 * r + 1)
        outside = (d > r + 1) | (d < 0.35 * r * np.cos(np.pi / 32) - 1)
    elif name == "cross":
        inside, outside = _plus_regions(dx, dy, r)
    elif name == "diamond":  # |x| + |y| < 0.85 sqrt(2) r
        l1, rd = np.abs(dx) + np.abs(dy), 0.85 * np.sqrt(2) * r
        inside, outside = l1 < rd - 1.5, l1 > rd + 1.5
    elif name == "hexagon":  # between the inscribed and circumscribed circles
        inside, outside = d < r * np.cos(np.pi / 6) - 1, d > r + 1
    elif name == "star":  # the inner pentagon (notches at >= 0.45 r) is filled
        inside, outside = d < 0.45 * r * np.cos(np.pi / 5) - 1, d > r + 1
    elif name == "frame":  # outer half side 0.85 r, hole 45-65% of it
        inside = (cheb < 0.85 * r - 1) & (cheb > 0.65 * 0.85 * r + 1)
        outside = (cheb > 0.85 * r + 1) | (cheb < 0.45 * 0.85 * r - 1)
    else:  # x: the cross turned 45 degrees
        inside, outside = _plus_regions((dx + dy) / np.sqrt(2), (dy - dx) / np.sqrt(2), r)
    assert inside.sum() > 20 and outside.sum() > 20
    assert m[inside].all() and not m[outside].any()


def test_lookalike_pose_jitter_keeps_the_defining_orientation():
    # square vs diamond and cross vs x differ by 45 degrees; the random pose (rotation +-12
    # degrees, aspect 0.8-1.25) keeps them apart: the extent along the axes vs along the
    # diagonals separates the two in every draw (square: corners on the diagonals, < 1;
    # cross: arm tips on the axes, > 1; diamond and x the other way round).
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    idx = {n: i for i, n in enumerate(LOOKALIKE)}
    for seed in range(20):
        for axis_name, diag_name in (("square", "diamond"), ("cross", "x")):
            ratios = []
            for name in (axis_name, diag_name):
                rng = np.random.default_rng(seed)
                m = _lookalike_mask(idx[name], 47.5, 47.5, 60.0, h, w, rng)
                dx, dy = xx[m] - 47.5, yy[m] - 47.5
                along_axes = np.maximum(np.abs(dx), np.abs(dy)).max()
                along_diag = (np.maximum(np.abs(dx + dy), np.abs(dx - dy)) / np.sqrt(2)).max()
                ratios.append(along_axes / along_diag)
            assert (ratios[0] - 1) * (ratios[1] - 1) < 0, (seed, axis_name, ratios)

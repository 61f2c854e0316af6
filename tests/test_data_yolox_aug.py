"""YOLOX's augmentations (fgd_jax.data.yolox_aug): boxes follow the pixels.

Each image is a dark background with filled boxes of distinct pure colours; after a transform
every pixel of a box's colour must lie inside that box's transformed box (up to the 1-2 px a
bilinear edge spreads), and an axis-aligned box's interior must be its colour. Padded GT
slots stay invalid, shapes are static, the raw BGR / pad-114 input and the mode switch are
checked on whole examples and on the grain loader.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fgd_jax.config import shapes_data, yolox_coco_data
from fgd_jax.data import yolox_aug as Y
from fgd_jax.data.pipeline import build_train_loader

COLORS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
    np.uint8,
)
BG = 30


def _image(h, w, boxes, labels):
    img = np.full((h, w, 3), BG, np.uint8)
    for (x1, y1, x2, y2), lab in zip(boxes, labels, strict=True):
        img[int(y1) : int(y2), int(x1) : int(x2)] = COLORS[lab]
    return img


def _is_color(img, lab, tol=60):
    return np.all(np.abs(img.astype(np.int32) - COLORS[lab].astype(np.int32)) <= tol, -1)


def _check_follow(img, boxes, labels, slack=2.0, interior=True):
    """Pixels of each colour inside its (slack-grown) box; box interiors of that colour."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = xs + 0.5, ys + 0.5  # pixel centres
    for lab in np.unique(labels):
        sel = boxes[labels == lab]
        inside = np.zeros((h, w), bool)
        for x1, y1, x2, y2 in sel:
            inside |= (
                (cx >= x1 - slack) & (cx <= x2 + slack) & (cy >= y1 - slack) & (cy <= y2 + slack)
            )
        colored = _is_color(img, lab)
        assert not (colored & ~inside).any(), f"colour {lab} outside its boxes"
        if interior:
            for x1, y1, x2, y2 in sel:
                core = (
                    (cx >= x1 + slack)
                    & (cx <= x2 - slack)
                    & (cy >= y1 + slack)
                    & (cy <= y2 - slack)
                )
                if core.sum() > 4:
                    assert colored[core].mean() > 0.95, f"box {lab} interior not its colour"


def _scene(rng, lab0, n=2, hw=None):
    h, w = hw if hw is not None else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    boxes, labels = [], []
    for k in range(n):
        x1, y1 = rng.integers(0, w - 16), rng.integers(0, h - 16)
        bw, bh = rng.integers(8, min(30, w - x1) + 1), rng.integers(8, min(30, h - y1) + 1)
        boxes.append([x1, y1, x1 + bw, y1 + bh])
        labels.append((lab0 + k) % len(COLORS))
    # later boxes paint over earlier ones: keep them disjoint in colour only by label order
    boxes = np.array(boxes, np.float32)
    labels = np.array(labels, np.int32)
    return _image(h, w, boxes, labels), boxes, labels


def _disjoint_scene(rng, lab):
    """One box per image (so no box hides another)."""
    return _scene(rng, lab, n=1)


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_boxes_follow_pixels(seed):
    rng = np.random.default_rng(seed)
    scenes = [_disjoint_scene(rng, k) for k in range(4)]
    img, boxes, labels = Y.mosaic(
        [s[0] for s in scenes], [s[1] for s in scenes], [s[2] for s in scenes], rng, (64, 64)
    )
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert (img == Y.PAD).any()  # the canvas is padded with 114
    _check_follow(img, boxes, labels)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= 128)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rotate", [0.0, 10.0])
def test_affine_boxes_follow_pixels(seed, rotate):
    rng = np.random.default_rng(seed)
    img, boxes, labels = _scene(rng, seed, n=1, hw=(128, 128))
    out, b, lab = Y.random_affine(
        img, boxes, labels, rng, border=(-32, -32), scale_range=(0.5, 1.5),
        max_rotate=rotate, max_shear=2.0 if rotate else 0.0,
    )  # fmt: skip
    assert out.shape == (64, 64, 3)
    assert len(b) == len(lab)
    _check_follow(out, b, lab, interior=not rotate)
    assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])


def test_affine_identity_and_pure_scale_are_exact():
    rng = np.random.default_rng(0)
    img, boxes, labels = _scene(rng, 0, n=1, hw=(64, 64))
    m = np.diag([2.0, 2.0, 1.0]).astype(np.float32)
    out = Y.warp_affine(img, m, (128, 128))
    b = Y.transform_boxes(boxes, m)
    np.testing.assert_allclose(b, boxes * 2)
    _check_follow(out, b, labels)
    np.testing.assert_array_equal(Y.warp_affine(img, np.eye(3, dtype=np.float32), (64, 64)), img)
    # outside the source: the border value
    far = Y.warp_affine(img, np.array([[1, 0, 100], [0, 1, 0], [0, 0, 1]], np.float32), (8, 8))
    assert np.all(far == Y.PAD)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_boxes_follow_pixels(seed):
    rng = np.random.default_rng(seed)
    base = np.zeros((64, 64, 3), np.uint8)
    other, ob, ol = _scene(rng, seed, n=1)
    out, b, lab = Y.mixup(
        base, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), other, ob, ol, rng,
        (64, 64), (0.8, 1.6),
    )  # fmt: skip
    # the mixed-in colour is halved by the 50 / 50 blend with black
    half = (out.astype(np.int32) * 2).clip(0, 255).astype(np.uint8)
    assert len(b) <= 1
    if len(b):
        _check_follow(half, b, lab)
    else:  # the box left the crop: none of its colour either
        assert not _is_color(half, int(ol[0])).any()
    # an image to mix without boxes changes nothing
    same = Y.mixup(base, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), other,
                   np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), rng)  # fmt: skip
    assert same[0] is base


def test_hsv_shift_and_jitter():
    """Hue turns in cv2's 2-degree units, S and V shift and clip, grey stays grey."""
    import colorsys

    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    for g in (-5, -2, 3, 5):
        out = Y.hsv_shift(red, np.array([g, 0, 0]))
        h, s, v = colorsys.rgb_to_hsv(*(out[0, 0] / 255.0))
        deg = (h * 360 + 180) % 360 - 180
        assert abs(deg - 2 * g) <= 2.0 and abs(v * 255 - 200) <= 1 and s > 0.98, (g, deg)
    grey = np.full((4, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(Y.hsv_shift(grey, np.array([5, 0, 20])), grey + 20)
    np.testing.assert_array_equal(Y.hsv_shift(grey, np.array([0, 0, -200])), grey * 0)
    half = np.array([[[200, 100, 100]]], np.uint8)  # S = 0.5: S + 30 -> 158 / 255
    out = Y.hsv_shift(half, np.array([0, 30, 0]))
    assert abs(colorsys.rgb_to_hsv(*(out[0, 0] / 255.0))[1] * 255 - (128 + 30)) <= 2
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    same = Y.hsv_shift(img, np.array([0, 0, 0]))
    assert np.abs(same.astype(int) - img.astype(int)).max() <= 8  # 8-bit HSV round trip
    out = Y.hsv_jitter(img, np.random.default_rng(3))
    assert out.shape == img.shape and out.dtype == np.uint8


def _png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, boxes, labels = _scene(rng, i, n=1)
        if i == 2:  # an image without GT (filter_empty_gt=False keeps such images)
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
            img = np.full_like(img, BG)
        out.append(dict(image_bytes=_png(img), image_id=i, boxes=boxes, labels=labels,
                        ignore_boxes=np.zeros((0, 4), np.float32)))  # fmt: skip
    return out


@pytest.mark.parametrize("epoch", [0, 3])
def test_yolox_example_static_keys_and_mode_switch(epoch):
    cfg = Y.YOLOXAugCfg(img_scale=(64, 64), mode_switch_epoch=3)
    records = _records(6)
    for seed in range(3):
        ex = Y.make_yolox_example(records, seed, (64, 64), 5, 2, cfg,
                                  np.random.default_rng(seed), epoch=epoch)  # fmt: skip
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.float32
        assert ex["boxes"].shape == (5, 4) and ex["valid"].shape == (5,)
        assert not ex["ignore_valid"].any()
        v = ex["valid"]
        assert np.all(ex["labels"][~v] == -1) and np.all(ex["boxes"][~v] == 0)
        b = ex["boxes"][v]
        assert np.all(b[:, 2] - b[:, 0] > 1) and np.all(b[:, 3] - b[:, 1] > 1)
        assert np.all(b >= 0) and np.all(b[:, 2:] <= 64)
        assert bool(ex["use_l1"]) == (epoch >= 3)
        h, w = ex["img_shape"]
        assert np.all(ex["image"][h:] == 114) and np.all(ex["image"][:, w:] == 114)
        assert max(h, w) == 64  # resized to fit 64 x 64, keeping the ratio
        if epoch >= 3:  # mode switched: one image, resized and maybe flipped
            assert ex["image_id"] == seed
    # without HSV jitter the switched pipeline's boxes follow the pixels
    plain = Y.YOLOXAugCfg(img_scale=(64, 64), mode_switch_epoch=0, hsv_delta=(0, 0, 0))
    for seed in range(6):
        ex = Y.make_yolox_example(records, seed, (64, 64), 5, 2, plain,
                                  np.random.default_rng(seed))  # fmt: skip
        rgb = ex["image"][..., ::-1].clip(0, 255).astype(np.uint8)
        _check_follow(rgb, ex["boxes"][ex["valid"]], ex["labels"][ex["valid"]])


def test_yolox_loader_batches(tmp_path):
    cfg = shapes_data(root=str(tmp_path / "ds"), num_train=8, num_val=4, image_size=48)
    ycfg = yolox_coco_data(mode_switch_epoch=1)
    for key in ("pixel_style", "pad_value", "filter_empty_gt", "augment", "yolox"):
        cfg[key] = ycfg[key]
    cfg.yolox.img_scale = (48, 48)
    cfg.num_workers = 0
    loader = build_train_loader(cfg, 4, seed=0, process_index=0, process_count=1)
    spe = loader.steps_per_epoch
    batches = [next(loader) for _ in range(spe + 1)]
    loader.close()
    for k, b in enumerate(batches):
        assert b["image"].shape == (4, 48, 48, 3) and b["boxes"].shape == (4, 16, 4)
        assert b["use_l1"].shape == (4,) and bool(b["use_l1"].all()) == (k >= spe)
        assert np.all(b["labels"][~b["valid"]] == -1)
    assert batches[0]["valid"].any()

"""Instance masks in the data path (fgd_jax.data.masks, coco.py with_mask, example.py grids).

References: torchvision `roi_align(aligned=True, sampling_ratio=0)` (mmcv's RoIAlign, which
mmdetection's `BitmapMasks.crop_and_resize` uses) on mmdetection's full-canvas bitmap
(pycocotools decode, cv2-nearest rescale, flip, pad: `masks.resized_bitmap`); pycocotools for
the shapes set's RLE.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from fgd_jax.config import shapes_data
from fgd_jax.data import masks as M
from fgd_jax.data.coco import load_coco_records
from fgd_jax.data.example import make_example
from fgd_jax.data.pipeline import build_train_loader
from fgd_jax.data.shapes import make_shapes_dataset


def _roi_align_np(full: np.ndarray, boxes: np.ndarray, out: int) -> np.ndarray:
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes.astype(np.float32))], 1)
    t = roi_align(torch.from_numpy(full.astype(np.float32))[None, None], rois, out, 1.0, 0, True)
    return t[:, 0].numpy()


def test_nearest_index_is_cv2_inter_nearest():
    # cv2 INTER_NEAREST: src = min(floor(dst * src_size / dst_size), src_size - 1)
    assert M.nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert M.nearest_index(5, 3).tolist() == [0, 1, 3]
    assert M.nearest_index(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("flipped", [False, True])
def test_grid_cells_equal_roi_align_of_the_full_bitmap(flipped):
    """Each grid cell is torchvision's RoIAlign of mmdetection's full bitmap over the region
    (up to the uint8 rounding), for upscaling and downscaling, flipped or not."""
    rng = np.random.default_rng(0)
    for (h0, w0), (rh, rw) in [((30, 41), (67, 92)), ((90, 70), (40, 31))]:
        pts = np.stack([rng.uniform(3, w0 - 3, 7), rng.uniform(3, h0 - 3, 7)], 1)
        bitmap = M.decode_segmentation([list(pts.reshape(-1))], (h0, w0))
        ys, xs = np.nonzero(bitmap)
        sx, sy = rw / w0, rh / h0
        box = np.array([xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy])
        if flipped:
            box = np.array([rw - box[2], box[1], rw - box[0], box[3]])
        canvas = (rh + 5, rw + 3)
        vals, region = M.mask_grid(bitmap, box, (rh, rw), canvas, flipped, 24)
        full = M.resized_bitmap(bitmap, (rh, rw), canvas, flipped)
        ref = _roi_align_np(full, region[None].astype(np.float64), 24)[0]
        assert np.abs(vals / 255.0 - ref).max() <= 0.5 / 255 + 1e-6
        # the region holds the whole mask plus 1 px: the full bitmap is zero outside it
        x1, y1, x2, y2 = region
        inside = np.zeros_like(full, bool)
        inside[int(y1) + 1 : int(np.ceil(y2)) - 1, int(x1) + 1 : int(np.ceil(x2)) - 1] = True
        assert full[~inside].sum() == 0 and full.sum() > 0


def test_mask_targets_iou_bound_small_sample():
    """Targets rebuilt from 56 x 56 grids vs mmdetection's (RoIAlign of the full bitmap,
    >= 0.5) on COCO-like polygons with jittered positive proposals: mean IoU >= 0.98 (the full
    measurement: benchmarks/results/mask_targets_cpu.md)."""
    from benchmarks.mask_targets import evaluate, make_cases, reference_targets

    cases = make_cases(12, seed=1, proposals=4)
    for c in cases:
        c["reference"] = reference_targets(c)
    r = evaluate(cases, grid=56, samples=2)
    assert r["mean"] >= 0.98, r


# ------------------------------------------------------------------- annotations, bad input
def _write(tmp_path, anns, hw=(40, 60)):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((*hw, 3), np.uint8)).save(img_dir / "a.png")
    data = dict(
        images=[dict(id=7, file_name="a.png", height=hw[0], width=hw[1])],
        annotations=[
            dict(id=100 + i, image_id=7, category_id=1, bbox=[5, 5, 20, 20], area=400, iscrowd=0)
            | a
            for i, a in enumerate(anns)
        ],
        categories=[dict(id=1, name="thing")],
    )
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(img_dir)


GOOD = [5.0, 5.0, 25.0, 5.0, 25.0, 25.0, 5.0, 25.0]


@pytest.mark.parametrize(
    "segm, why",
    [
        ([[5.0, 5.0, 25.0, 5.0]], "4 coordinates"),
        ([[5.0, 5.0, 25.0, 5.0, 25.0]], "at least 6|odd"),
        ([[5.0, 5.0, 25.0, float("nan"), 25.0, 25.0]], "non-finite"),
        ({"size": [41, 60], "counts": "abc"}, r"RLE size \[41, 60\] differs"),
        ({"size": [40, 60], "counts": [10, 20]}, "counts sum"),
        ("x", "polygons .* or RLE"),
    ],
)
def test_bad_segmentation_error_names_file_image_and_annotation(tmp_path, segm, why):
    ann, imgs = _write(tmp_path, [dict(segmentation=[GOOD]), dict(segmentation=segm)])
    with pytest.raises(M.BadMaskError, match=rf"ann.json: image id 7, annotation id 101: .*{why}"):
        load_coco_records(ann, imgs, filter_empty=True, with_mask=True)
    # masks are opt-in: without with_mask the same json reads as before
    assert len(load_coco_records(ann, imgs, filter_empty=True).records[0]["boxes"]) == 2


def test_bad_segmentation_skip_counts(tmp_path):
    bad_part = [1.0, 2.0, 3.0, 4.0]
    ann, imgs = _write(
        tmp_path,
        [
            dict(segmentation=[GOOD, bad_part]),  # bad part dropped, annotation kept
            dict(segmentation=[bad_part]),  # nothing usable: annotation dropped
            dict(segmentation={"size": [9, 9], "counts": "abc"}),  # wrong size: dropped
            dict(segmentation=[GOOD]),
        ],
    )
    with pytest.warns(UserWarning, match="3 annotation"):
        recs = load_coco_records(ann, imgs, True, with_mask=True, on_bad_mask="skip")
    r = recs.records[0]
    assert recs.num_bad_masks == 3 and len(r["boxes"]) == len(r["masks"]) == 2
    assert r["masks"][0] == [GOOD]


def test_crowd_rle_is_an_ignore_box_without_mask(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.ones((40, 60), np.uint8)))
    crowd = dict(segmentation=dict(size=[40, 60], counts=rle["counts"].decode()), iscrowd=1)
    ann, imgs = _write(tmp_path, [dict(segmentation=[GOOD]), crowd])
    r = load_coco_records(ann, imgs, True, with_mask=True).records[0]
    assert len(r["boxes"]) == len(r["masks"]) == 1 and len(r["ignore_boxes"]) == 1


# ---------------------------------------------------------------------------- shapes + batch
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("m") / "ds"
    return make_shapes_dataset(root, num_train=6, num_val=2, image_size=64, seed=5)


def test_shapes_rle_is_the_visible_region_of_its_box(shapes):
    data = json.load(open(shapes["train_ann"]))
    assert data["annotations"]
    for a in data["annotations"]:
        m = M.decode_segmentation(a["segmentation"], (64, 64))
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert [xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y] == [x, y, w, h]
        assert m.sum() == a["area"]


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_example_masks_follow_resize_and_flip(shapes, flip):
    """`make_example` grids: targets for the GT boxes themselves equal mmdetection's (RoIAlign
    of the resized, flipped, padded full bitmap, >= 0.5) up to a few boundary bins."""
    from fgd_jax.ops.masks import mask_targets

    recs = load_coco_records(shapes["train_ann"], shapes["train_images"], True, with_mask=True)
    rec = recs.records[0]
    ex = make_example(rec, (112, 144), (100, 100), "pytorch", 8, 2, flip, None, mask_grid=32)
    n = len(rec["boxes"])
    assert ex["masks"].shape == (8, 32, 32) and ex["masks"].dtype == np.uint8
    assert ex["mask_regions"].shape == (8, 4) and not ex["masks"][n:].any()
    assert bool(ex["flip"]) == (flip == 1.0)
    rh, rw = (int(v) for v in ex["img_shape"])
    boxes = ex["boxes"][:n]
    t = np.asarray(
        mask_targets(ex["masks"], ex["mask_regions"], boxes, np.arange(n), np.array([112, 144]))
    )
    for i in range(n):
        bitmap = M.decode_segmentation(rec["masks"][i], (64, 64))
        full = M.resized_bitmap(bitmap, (rh, rw), (112, 144), bool(ex["flip"]))
        ref = _roi_align_np(full, boxes[i : i + 1], 28)[0] >= 0.5
        ours = t[i] > 0.5
        assert (ref & ours).sum() / max((ref | ours).sum(), 1) >= 0.95


def test_loader_masks_opt_in(shapes, tmp_path):
    cfg = shapes_data(root=shapes["root"], num_train=6, num_val=2, image_size=64)
    cfg.shapes_seed, cfg.num_workers = 5, 0
    plain = next(build_train_loader(cfg, 2, seed=0, process_index=0, process_count=1))
    assert "masks" not in plain and "mask_regions" not in plain
    cfg.with_mask, cfg.mask_grid = True, 16
    b = next(build_train_loader(cfg, 2, seed=0, process_index=0, process_count=1))
    assert b["masks"].shape == (2, cfg.max_boxes, 16, 16) and b["masks"].dtype == np.uint8
    assert b["mask_regions"].shape == (2, cfg.max_boxes, 4)
    assert (b["masks"].reshape(2, cfg.max_boxes, -1).max(-1) > 127)[b["valid"]].all()
    for k in plain:
        np.testing.assert_array_equal(plain[k], b[k], err_msg=k)

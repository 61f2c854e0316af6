"""A small COCO-format dataset written by the tests (shared by tests/test_data_*.py).

It holds the awkward cases: non-contiguous category ids listed out of id order, crowd boxes,
zero-area and sub-pixel boxes, a box outside the image, an image without annotations, an image
whose only annotation is crowd, an image smaller than 32 px, portrait and landscape images,
grayscale and RGBA PNGs and an EXIF-rotated JPEG.
"""

import json
import os

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 7, "name": "seven"},
    {"id": 2, "name": "two"},
    {"id": 40, "name": "forty"},
]


def _save(path, arr, mode=None, exif_orientation=None):
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    if exif_orientation:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, quality=95, exif=exif)
    else:
        im.save(path)


def write_coco_fixture(root) -> dict:
    """Writes root/annotations/instances.json and root/images/*; returns the paths."""
    root = str(root)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    rng = np.random.default_rng(0)

    def noise(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    images = []

    def add(img_id, name, h, w, mode=None, exif=None, stored_hw=None):
        sh, sw = stored_hw or (h, w)
        _save(os.path.join(img_dir, name), noise(sh, sw), mode, exif)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})

    add(11, "land.png", 60, 90)  # landscape
    add(3, "port.png", 90, 50)  # portrait
    add(25, "gray.png", 64, 64, mode="L")
    add(4, "rgba.png", 48, 80, mode="RGBA")
    # EXIF orientation 6: stored 40x70 (h x w), displayed 70x40; the json has displayed size.
    add(5, "exif.jpg", 70, 40, exif=6, stored_hw=(40, 70))
    add(6, "empty.png", 50, 50)  # no annotations at all
    add(7, "crowdonly.png", 50, 60)  # only a crowd annotation
    add(8, "tiny.png", 20, 60)  # smaller than 32 px
    anns = [
        # land.png: two normal boxes, a crowd box, a zero-area box, a w<1 box, an unknown cat.
        dict(image_id=11, category_id=7, bbox=[10, 5, 30.5, 20], area=600, iscrowd=0),
        dict(image_id=11, category_id=40, bbox=[50, 30, 39, 29], area=1100, iscrowd=0),
        dict(image_id=11, category_id=2, bbox=[0, 0, 40, 40], area=1600, iscrowd=1),
        dict(image_id=11, category_id=2, bbox=[5, 5, 10, 10], area=0, iscrowd=0),
        dict(image_id=11, category_id=2, bbox=[5, 5, 0.5, 10], area=5, iscrowd=0),
        dict(image_id=11, category_id=99, bbox=[5, 5, 10, 10], area=100, iscrowd=0),
        # port.png: a box partly outside (kept, not clipped at load), one fully outside (dropped)
        dict(image_id=3, category_id=2, bbox=[30, 70, 40, 40], area=1600, iscrowd=0),
        dict(image_id=3, category_id=2, bbox=[60, 10, 10, 10], area=100, iscrowd=0),
        dict(image_id=25, category_id=7, bbox=[1, 2, 3, 4], area=12, iscrowd=0),
        dict(image_id=4, category_id=40, bbox=[2, 2, 60, 40], area=2400, iscrowd=0),
        dict(image_id=4, category_id=7, bbox=[20, 10, 10, 10], area=100, iscrowd=0),
        dict(image_id=5, category_id=2, bbox=[3, 30, 30, 30], area=900, iscrowd=0),
        dict(image_id=7, category_id=7, bbox=[0, 0, 20, 20], area=400, iscrowd=1),
        dict(image_id=8, category_id=7, bbox=[0, 0, 20, 10], area=200, iscrowd=0),
    ]
    for i, a in enumerate(anns):
        a["id"] = 100 + i
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    ann_file = os.path.join(root, "annotations", "instances.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return {"root": root, "ann_file": ann_file, "image_dir": img_dir}


def test_fixture_is_valid_coco(tmp_path):
    from pycocotools.coco import COCO

    p = write_coco_fixture(tmp_path)
    coco = COCO(p["ann_file"])
    assert len(coco.getImgIds()) == 8 and len(coco.getCatIds()) == 3
    for info in coco.imgs.values():  # the json size is the displayed (EXIF-applied) size
        with Image.open(os.path.join(p["image_dir"], info["file_name"])) as im:
            from PIL import ImageOps

            w, h = ImageOps.exif_transpose(im).size
        assert (h, w) == (info["height"], info["width"])

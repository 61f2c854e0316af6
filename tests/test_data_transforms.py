"""Transforms against independent references: PIL (decode), torch `F.interpolate` bilinear
without antialiasing (= cv2 INTER_LINEAR, what mmcv uses), torchvision `normalize`, and the
pixels of boxes drawn into the image (geometry of resize / flip)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from fgd_jax.config import PYTORCH_PIXEL_MEAN, PYTORCH_PIXEL_STD
from fgd_jax.data import transforms as T


def _torch_bilinear(img: np.ndarray, hw) -> np.ndarray:
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_decode_modes_match_pil(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8))
    if mode == "P":
        im = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 4096, (17, 23), dtype=np.uint16))
    else:
        im = rgb.convert(mode)
    path = tmp_path / "x.png"
    im.save(path)
    got = T.decode_image(path)
    assert got.shape == (17, 23, 3) and got.dtype == np.uint8
    if mode == "I;16":  # rescaled to 0..255 by the maximum, replicated on 3 channels
        raw = np.asarray(Image.open(path), dtype=np.float64)
        ref = np.clip(raw / raw.max() * 255 + 0.5, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(got, np.repeat(ref[..., None], 3, 2))
    else:  # reference: PIL's own RGB conversion (alpha dropped as cv2 does)
        ref = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(got, ref)


def test_decode_applies_exif_orientation(tmp_path):
    # A blocky pattern survives JPEG; orientation 6 means "rotate 90 degrees clockwise".
    base = np.zeros((32, 48, 3), np.uint8)
    base[:16, :16] = (255, 0, 0)
    base[16:, 32:] = (0, 0, 255)
    im = Image.fromarray(base)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    im.save(path, quality=100, exif=exif)
    got = T.decode_image(path)
    assert got.shape == (48, 32, 3)
    # Exact: the stored (unrotated) JPEG pixels as PIL decodes them, turned clockwise by numpy.
    raw = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(got, np.rot90(raw, k=-1))
    # And the layout is the intended one (JPEG chroma blur only near the block edges).
    assert np.abs(got.astype(int) - np.rot90(base, k=-1).astype(int)).mean() < 8


def test_decode_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(T.BadImageError, match="nope.jpg"):
        T.decode_image(missing)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(T.BadImageError, match="junk.jpg"):
        T.decode_image(junk)
    good = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(T.BadImageError, match="trunc.jpg"):
        T.decode_image(trunc)


# ------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize(
    "hw,scale",
    [
        ((480, 640), (1333, 800)),
        ((640, 427), (1333, 800)),
        ((100, 1000), (1333, 800)),
        ((375, 500), (800, 1333)),
        ((128, 128), (128, 128)),
        ((333, 333), (1333, 640)),
    ],
)
def test_rescale_size_mmcv_formula(hw, scale):
    h, w = hw
    # mmcv.rescale_size, written out: factor from both edges, new size by int(x * s + 0.5).
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    assert T.rescale_size(hw, scale) == ((int(h * s + 0.5), int(w * s + 0.5)), s)


@pytest.mark.parametrize("src,dst", [((20, 30), (33, 50)), ((40, 60), (23, 31)), ((9, 7), (9, 16))])
def test_resize_bilinear_matches_torch_no_antialias(src, dst):
    img = np.random.default_rng(1).integers(0, 256, (*src, 3), dtype=np.uint8)
    got = T.resize_bilinear(img, dst).astype(np.float32)
    ref = _torch_bilinear(img, dst)
    # uint8 rounding on both sides: at most one grey level (PIL fixed point vs exact float).
    assert np.abs(got - ref).max() <= 1.0


def _draw_box(h, w, box, colour=(250, 10, 10)):
    img = np.full((h, w, 3), 30, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = colour
    return img


def _region(img, colour=(250, 10, 10), tol=60):
    m = np.abs(img.astype(int) - np.array(colour)).sum(-1) < tol
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize(
    "hw,scale", [((60, 80), (133, 80)), ((90, 50), (133, 80)), ((200, 120), (100, 60))]
)
def test_resize_and_flip_boxes_follow_pixels(hw, scale):
    box = [13, 9, 41, 37]
    img = _draw_box(*hw, box)
    out, boxes, sf = T.resize_keep_ratio(img, np.array([box], np.float32), scale)
    (nh, nw), _ = T.rescale_size(hw, scale)
    assert out.shape == (nh, nw, 3)
    np.testing.assert_allclose(sf, [nw / hw[1], nh / hw[0]] * 2, rtol=1e-6)
    np.testing.assert_allclose(boxes[0], _region(out), atol=1.0)
    flipped, fboxes, did = T.random_flip(out, boxes, 1.0, np.random.default_rng(0))
    assert did
    np.testing.assert_allclose(fboxes[0], _region(flipped), atol=1.0)
    np.testing.assert_array_equal(flipped, out[:, ::-1])
    same, sboxes, did = T.random_flip(out, boxes, 0.0, np.random.default_rng(0))
    assert not did and same is out
    np.testing.assert_array_equal(sboxes, boxes)


def test_resize_clips_boxes_and_respects_canvas():
    img = np.zeros((50, 100, 3), np.uint8)
    boxes = np.array([[-5, -5, 120, 60]], np.float32)  # beyond the image
    out, b, _ = T.resize_keep_ratio(img, boxes, (200, 100))
    assert out.shape == (100, 200, 3)
    np.testing.assert_array_equal(b[0], [0, 0, 200, 100])
    out, b, sf = T.resize_keep_ratio(img, boxes, (200, 100), max_hw=(64, 64))
    assert out.shape[0] <= 64 and out.shape[1] <= 64


def test_flip_boxes_mmdet_convention():
    b = np.array([[10, 2, 30, 8]], np.float32)
    np.testing.assert_array_equal(T.flip_boxes(b, 100), [[70, 2, 90, 8]])


# ------------------------------------------------------------------------- normalize / pad
def test_normalize_pytorch_matches_torchvision():
    img = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    got = T.normalize(img, "pytorch")
    ref = (
        TF.normalize(
            torch.from_numpy(img).permute(2, 0, 1).float(), PYTORCH_PIXEL_MEAN, PYTORCH_PIXEL_STD
        )
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    assert got.dtype == np.float32


def test_normalize_caffe_is_bgr_minus_mean():
    img = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    got = T.normalize(img, "caffe")
    # mmdet caffe img_norm_cfg: BGR, mean [103.530, 116.280, 123.675], std 1.
    ref = img[..., ::-1].astype(np.float64) - np.array([103.530, 116.280, 123.675])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(ValueError, match="pixel_style"):
        T.normalize(img, "tf")


def test_pad_to():
    x = np.ones((3, 4, 3), np.float32)
    p = T.pad_to(x, (5, 6))
    assert p.shape == (5, 6, 3) and p[:3, :4].min() == 1 and p.sum() == x.sum()
    with pytest.raises(ValueError, match="canvas"):
        T.pad_to(x, (2, 6))


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_normalize_pad_equals_composition(style):
    img = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)[:, ::-1]
    np.testing.assert_array_equal(
        T.normalize_pad(img, (8, 9), style), T.pad_to(T.normalize(img, style), (8, 9))
    )

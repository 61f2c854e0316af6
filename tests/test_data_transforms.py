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
# mmdetection 2.x decodes with mmcv `imfrombytes(flag='color')`, cv2 backend: cv2.imdecode with
# IMREAD_COLOR. opencv is not installed here, so the expected pixels are written from OpenCV's
# source rules (imgcodecs, 4.x): PNG `PngDecoder::readData` asks libpng for 8 bits
# (`png_set_strip_16`: the high byte, v >> 8), 3 channels (`png_set_strip_alpha`: alpha
# dropped, not composited), `png_set_palette_to_rgb`, `png_set_gray_to_rgb`; JPEG CMYK goes
# through `icvCvt_CMYK2BGR_8u_C4C3R` (x = k - ((255 - x) * k >> 8) on the stored samples); the
# EXIF orientation is applied unless IMREAD_IGNORE_ORIENTATION (imread's documentation).
def _png16(path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG (PIL writes 16 bits for grayscale only): 0 gray, 2 RGB, 4 gray+alpha,
    6 RGBA; `arr` [H, W] or [H, W, C] uint16."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    png = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


U16 = np.array([[0, 255, 256, 1000], [40000, 65535, 511, 65280]], np.uint16)


def _rgb3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _decode_both(path) -> np.ndarray:
    """decode_image and decode_image_bytes agree; returns the decoded image."""
    got = T.decode_image(path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(T.decode_image_bytes(f.read(), str(path)), got)
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
    return got


def test_decode_8bit_rgb_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), rgb)


def test_decode_16bit_gray_png_keeps_the_high_byte(tmp_path):
    Image.fromarray(U16).save(tmp_path / "x.png")  # PIL: mode I;16 -> 16-bit gray PNG
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    # a uint16 1000 decodes to 3 (cv2), not 255 * 1000 / max
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), _rgb3(U16 >> 8))
    flat = np.full((3, 4), 1000, np.uint16)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    assert (_decode_both(tmp_path / "flat.png") == 3).all()


@pytest.mark.parametrize("color_type", [2, 4, 6])
def test_decode_16bit_color_and_alpha_png(tmp_path, color_type):
    chans = {2: [U16, U16[::-1], U16[:, ::-1]], 4: [U16, U16[::-1]]}
    chans[6] = chans[2] + [U16[::-1, ::-1]]
    arr = np.stack(chans[color_type], -1)
    _png16(tmp_path / "x.png", arr, color_type)
    want = _rgb3(U16 >> 8) if color_type == 4 else (arr[..., :3] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), want)


def test_decode_gray_png(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), _rgb3(gray))


def test_decode_1bit_png(tmp_path):
    bits = np.random.default_rng(2).integers(0, 2, (5, 7)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "x.png")
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), _rgb3(bits * np.uint8(255)))


def test_decode_gray_alpha_png_drops_alpha(tmp_path):
    rng = np.random.default_rng(3)
    la = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
    la[0, :, 1] = 0  # fully transparent pixels keep their gray value (no compositing)
    Image.fromarray(la, mode="LA").save(tmp_path / "x.png")
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), _rgb3(la[..., 0]))


def test_decode_rgba_png_drops_alpha(tmp_path):
    rgba = np.random.default_rng(4).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "x.png")
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), rgba[..., :3])


def test_decode_palette_png(tmp_path):
    palette = np.random.default_rng(5).integers(0, 256, (16, 3), dtype=np.uint8)
    idx = np.random.default_rng(6).integers(0, 16, (5, 7), dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.ravel().tolist())
    im.save(tmp_path / "x.png", transparency=3)  # a tRNS entry: ignored, as strip_alpha does
    np.testing.assert_array_equal(_decode_both(tmp_path / "x.png"), palette[idx])


def test_decode_cmyk_jpeg_with_opencv_formula(tmp_path):
    rng = np.random.default_rng(7)
    cmyk = np.repeat(np.repeat(rng.integers(0, 256, (2, 3, 4), dtype=np.uint8), 8, 0), 8, 1)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "x.jpg", quality=100)
    im = Image.open(tmp_path / "x.jpg")
    # PIL writes Adobe-style inverted CMYK and inverts back when reading ('CMYK;I'): libjpeg's
    # samples, what OpenCV converts, are 255 minus PIL's values
    assert im.mode == "CMYK" and im.tile[0].args[0] == "CMYK;I"
    stored = 255 - np.asarray(im).astype(np.int64)
    k = stored[..., 3:]
    want = (k - (((255 - stored[..., :3]) * k) >> 8)).astype(np.uint8)
    got = _decode_both(tmp_path / "x.jpg")
    np.testing.assert_array_equal(got, want)
    # PIL's own CMYK -> RGB rounds differently (x * k / 255): not what mmdetection sees
    assert not np.array_equal(np.asarray(im.convert("RGB")), want)


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

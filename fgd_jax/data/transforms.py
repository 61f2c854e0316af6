"""Per-image transforms, pure numpy/PIL: decode, mmdetection 2.x resize / flip / normalize, pad.

The order is mmdetection's training pipeline: `decode_image` -> `resize_keep_ratio` ->
`random_flip` -> `normalize` -> `pad_to`. Images are HWC; until `normalize` they are uint8 RGB,
afterwards float32. Boxes are `[n, 4] float32 xyxy` in pixels of the current image (no "+1").

Resizing: mmcv resizes with cv2 `INTER_LINEAR` (half-pixel centres, no antialiasing). Upscaling
here uses PIL bilinear, which for scale >= 1 is the same triangle filter on the same pixel
centres, so the two differ only by fixed-point rounding (at most 1 grey level); downscaling uses
`_bilinear_cv2`, a numpy implementation of the cv2 formula, because PIL would antialias.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fgd_jax.config import (
    CAFFE_PIXEL_MEAN,
    CAFFE_PIXEL_STD,
    PYTORCH_PIXEL_MEAN,
    PYTORCH_PIXEL_STD,
)


class BadImageError(ValueError):
    """An image file that is missing, truncated or cannot be decoded (the message names it)."""


# ------------------------------------------------------------------------------------ decode
# mmdetection 2.x reads images with mmcv `imfrombytes(flag='color')`, cv2 backend:
# `cv2.imdecode(buf, IMREAD_COLOR)`, 8-bit BGR (here RGB; `normalize` swaps for 'caffe').
# What OpenCV's decoders do for each kind, matched below (imgcodecs source, 4.x):
#   - 16-bit PNG: libpng `png_set_strip_16`, the high byte of each sample (v >> 8);
#   - alpha (RGBA, gray + alpha, palette tRNS): `png_set_strip_alpha`, dropped, never
#     composited; palette: `png_set_palette_to_rgb`; gray: `png_set_gray_to_rgb`;
#   - CMYK JPEG: libjpeg's CMYK samples converted by `icvCvt_CMYK2BGR_8u_C4C3R`,
#     x = k - ((255 - x) * k >> 8);
#   - EXIF orientation: applied unless IMREAD_IGNORE_ORIENTATION, which flag='color' does
#     not set (mmcv's 'color_ignore_orientation' would).
# PIL already reduces 16-bit RGB / RGBA / gray+alpha PNGs to their high bytes when it opens
# them; 16-bit grayscale stays 16-bit (mode I;16), and CMYK is converted here.
def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as `[H, W, 3] uint8` RGB, pixel for pixel as mmcv's
    `imfrombytes(flag='color')` with the cv2 backend does (see the rules above).

    Raises:
      BadImageError: the file is missing, truncated, or not an image (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return _decode(im)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """`decode_image` for an encoded image held in memory; `name` is used in errors."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _decode(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def _decode(im: Image.Image) -> np.ndarray:
    # PIL un-inverts Adobe CMYK JPEGs ('CMYK;I'); OpenCV converts libjpeg's stored samples
    inverted_cmyk = im.mode == "CMYK" and any(_rawmode(t) == "CMYK;I" for t in im.tile)
    im.load()  # forces a full decode: truncated files fail here
    im = ImageOps.exif_transpose(im)
    return _to_rgb_array(im, inverted_cmyk)


def _rawmode(tile) -> str | None:
    """The raw mode of a PIL tile `(codec, extents, offset, args)`; args is the raw mode or a
    tuple starting with it."""
    args = tile[3]
    return args[0] if isinstance(args, tuple) and args else args


def _to_rgb_array(im: Image.Image, inverted_cmyk: bool = False) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: the high byte
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(arr.astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "CMYK":
        stored = np.asarray(im, dtype=np.int32)
        if inverted_cmyk:
            stored = 255 - stored
        k = stored[:, :, 3:]
        return (k - (((255 - stored[:, :, :3]) * k) >> 8)).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, LA, P, PA, RGBA, ... (alpha dropped, not composited)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


# ------------------------------------------------------------------------------------ resize
def rescale_size(
    hw: tuple[int, int], scale: tuple[int, int] = (1333, 800)
) -> tuple[tuple[int, int], float]:
    """mmcv `rescale_size` with keep_ratio: `(new_h, new_w), factor` for an image of (h, w).

    `scale` is (long, short) edge limits in either order: factor = min(long / max(h, w),
    short / min(h, w)); new size = int(w * factor + 0.5), int(h * factor + 0.5).
    """
    h, w = int(hw[0]), int(hw[1])
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    new_w = int(w * float(factor) + 0.5)
    new_h = int(h * float(factor) + 0.5)
    return (new_h, new_w), factor


def resize_bilinear(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize `[H, W, C] uint8` to `size_hw` with cv2 `INTER_LINEAR` semantics (see module doc)."""
    h, w = img.shape[:2]
    nh, nw = int(size_hw[0]), int(size_hw[1])
    if (nh, nw) == (h, w):
        return img
    if nh >= h and nw >= w:
        return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    return _bilinear_cv2(img, (nh, nw))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 source indices i0, i1 and weight of i1 for each output position along one axis."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _bilinear_cv2(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Separable half-pixel bilinear without antialiasing (cv2 INTER_LINEAR), rounded to uint8."""
    nh, nw = size_hw
    y0, y1, wy = _axis_weights(img.shape[0], nh)
    x0, x1, wx = _axis_weights(img.shape[1], nw)
    f = img.astype(np.float32)
    rows = f[y0] * (1.0 - wy)[:, None, None] + f[y1] * wy[:, None, None]
    out = rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def resize_keep_ratio(
    img: np.ndarray,
    boxes: np.ndarray,
    scale: tuple[int, int] = (1333, 800),
    max_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mmdetection 2.x `Resize(img_scale=scale, keep_ratio=True)` (mmcv `imrescale`).

    Args:
      img: `[H, W, C] uint8`.
      boxes: `[n, 4] float32 xyxy` original pixels (GT and ignore boxes may be concatenated).
      scale: (long, short) edge limits, in either order.
      max_hw: optional canvas (h, w) the result must fit; if the keep-ratio size does not fit,
        the factor is reduced until it does (never needed when canvases cover `scale`).
    Returns:
      `(resized [h, w, C] uint8, boxes [n, 4] float32 scaled by the actual (w_new / w,
      h_new / h) and clipped to the resized image, scale_factor [4] float32 (w, h, w, h))`.
    """
    h, w = img.shape[:2]
    (nh, nw), factor = rescale_size((h, w), scale)
    if max_hw is not None and (nh > max_hw[0] or nw > max_hw[1]):
        factor = min(factor, max_hw[0] / h, max_hw[1] / w)
        nh, nw = min(int(h * factor + 0.5), max_hw[0]), min(int(w * factor + 0.5), max_hw[1])
    out = resize_bilinear(img, (nh, nw))
    sf = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * sf
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, nw)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, nh)
    return out, boxes, sf


# -------------------------------------------------------------------------------------- flip
def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Horizontal flip of `[n, 4] xyxy` boxes in an image `width` wide (mmdet 2.x: x1' = w - x2)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def random_flip(
    img: np.ndarray, boxes: np.ndarray, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Flip `img [H, W, C]` and `boxes [n, 4] xyxy` horizontally with probability `prob`.

    Returns `(img, boxes, flipped)`; a flipped image is a reversed view (no copy). One draw
    from `rng` per call (also when prob is 0 or 1).
    """
    flipped = bool(rng.random() < prob)
    if not flipped:
        return img, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), False
    return img[:, ::-1], flip_boxes(boxes, img.shape[1]), True


# --------------------------------------------------------------------------- normalize / pad
PIXEL_STYLES = ("pytorch", "caffe", "raw_bgr")


def pixel_stats(style: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """`(mean [3], std [3], to_bgr)` for 'pytorch' (RGB, ImageNet mean/std), 'caffe' (BGR,
    mean only) or 'raw_bgr' (BGR 0-255, no normalization: mmdetection's YOLOX)."""
    if style == "pytorch":
        mean, std, to_bgr = PYTORCH_PIXEL_MEAN, PYTORCH_PIXEL_STD, False
    elif style == "caffe":
        mean, std, to_bgr = CAFFE_PIXEL_MEAN, CAFFE_PIXEL_STD, True
    elif style == "raw_bgr":
        mean, std, to_bgr = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True
    else:
        raise ValueError(f"pixel_style must be one of {PIXEL_STYLES}, got {style!r}")
    return np.array(mean, np.float32), np.array(std, np.float32), to_bgr


def normalize(img: np.ndarray, style: str = "pytorch") -> np.ndarray:
    """`[H, W, 3] uint8 RGB` -> float32: pytorch style (x - mean) / std in RGB, caffe style
    BGR with mean subtraction only (mmdetection `Normalize` with to_rgb True / False)."""
    mean, std, to_bgr = pixel_stats(style)
    x = img.astype(np.float32)
    if to_bgr:
        x = x[:, :, ::-1]
    return (x - mean) / std


def normalize_pad(
    img: np.ndarray, hw: tuple[int, int], style: str = "pytorch", pad_value: float = 0.0
) -> np.ndarray:
    """`pad_to(normalize(img, style), hw)` in one pass without temporaries (same numbers);
    the padding holds `pad_value` (network-input units: 114 for YOLOX's raw pixels)."""
    mean, std, to_bgr = pixel_stats(style)
    h, w = img.shape[:2]
    H, W = int(hw[0]), int(hw[1])
    if h > H or w > W:
        raise ValueError(f"image of size {(h, w)} does not fit the canvas {(H, W)}")
    out = (
        np.full((H, W, 3), pad_value, np.float32) if pad_value else np.zeros((H, W, 3), np.float32)
    )
    region = out[:h, :w]
    np.subtract(img[:, :, ::-1] if to_bgr else img, mean, out=region)
    np.divide(region, std, out=region)
    return out


def pad_to(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Zero-pad `[h, w, C]` at the bottom / right to `[H, W, C]` (after normalization)."""
    h, w = img.shape[:2]
    H, W = int(hw[0]), int(hw[1])
    if h > H or w > W:
        raise ValueError(f"image of size {(h, w)} does not fit the canvas {(H, W)}")
    out = np.zeros((H, W) + img.shape[2:], dtype=img.dtype)
    out[:h, :w] = img
    return out

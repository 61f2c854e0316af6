"""Pieces every dense head shares (RetinaNet, FCOS, the RPN; next GFL, RepPoints, YOLOX):
levels flattened into one axis, the valid flags of anchors / points on the canvas padding,
per-group loss normalisation, the detector API's output keys, and the test settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fgd_jax.ops import nms as nms_ops

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DenseTestCfg:
    """Inference settings of a one-stage detector (mmdetection `test_cfg`).

    nms_pre: anchors / points kept per level before NMS (top by score).
    score_thr: a (box, class) pair is a candidate when its score > score_thr.
    iou_threshold: class-wise NMS threshold. max_per_img: detections kept per image.
    max_candidates: (box, class) pairs passed to NMS, the best ones above `score_thr`;
      mmdetection passes all of them, the result is the same whenever the `max_per_img`-th
      kept detection is among them.
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    max_candidates: int = 4000


def flatten_levels(maps: Sequence[Array], last: int) -> Array:
    """`[B, H_l, W_l, A*last]` per level -> `[B, sum_l H_l*W_l*A, last]`, index `(y*W + x)*A + a`
    within a level, levels concatenated finest first (A = 1 for points)."""
    return jnp.concatenate([m.reshape(m.shape[0], -1, last) for m in maps], axis=1)


def anchor_valid_flags(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    num_anchors: int,
    img_shape: Array,
    size_divisor: int = 32,
) -> Array:
    """mmdetection `AnchorGenerator.valid_flags` for every image, levels concatenated.

    mmdetection pads each image to a multiple of `size_divisor` (its `pad_shape`) and marks the
    anchors of feature cells `y >= ceil(pad_h / stride)` or `x >= ceil(pad_w / stride)` invalid
    (they sit on the batch padding). Our canvas is larger than that per-image pad shape, so the
    per-image pad shape is rebuilt from `img_shape`. `size_divisor <= 0`: all anchors valid.

    Args: img_shape `[B, 2] int` (h, w) of the resized image; `num_anchors` per cell (1 for
      points). Returns `[B, N] bool`, N = sum_l H_l*W_l*num_anchors.
    """
    img_shape = jnp.asarray(img_shape)
    batch = img_shape.shape[0]
    flags = []
    for (h, w), s in zip(feat_shapes, strides, strict=True):
        if size_divisor <= 0:
            flags.append(jnp.ones((batch, h * w * num_anchors), bool))
            continue
        pad = jnp.ceil(img_shape.astype(jnp.float32) / size_divisor) * size_divisor
        vh = jnp.minimum(jnp.ceil(pad[:, 0] / s), h)
        vw = jnp.minimum(jnp.ceil(pad[:, 1] / s), w)
        ok_y = jnp.arange(h)[None, :] < vh[:, None]
        ok_x = jnp.arange(w)[None, :] < vw[:, None]
        ok = ok_y[:, :, None] & ok_x[:, None, :]  # [B, h, w]
        ok = jnp.broadcast_to(ok[..., None], (batch, h, w, num_anchors))
        flags.append(ok.reshape(batch, -1))
    return jnp.concatenate(flags, axis=1)


def point_valid_flags(
    feat_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    img_shape: Array,
    size_divisor: int = 32,
) -> Array:
    """`[B, N] bool`: point `(x, y)` of level `l` lies in the image's padded shape
    `ceil(img_shape / size_divisor) * size_divisor` (`anchor_valid_flags` with one anchor
    per cell). `size_divisor <= 0`: all True. `img_shape: [B, 2]`."""
    return anchor_valid_flags(feat_shapes, strides, 1, img_shape, size_divisor)


def group_mean(num_per_img: Array, den_per_img: Array, group: int, who: str = "loss") -> Array:
    """`mean_g(sum_{i in g} num_i / max(sum_{i in g} den_i, 1))` over groups of `group`
    consecutive images (`group <= 0`: one group, the whole batch).

    mmdetection normalises each GPU's loss by that GPU's own count and DDP averages the
    gradients; `group = samples_per_gpu` reproduces that (model config
    `train_cfg.loss_norm_group`). Args: `[B]` per-image numerators and normalisers."""
    batch = num_per_img.shape[0]
    g = batch if group <= 0 else group
    if batch % g:
        raise ValueError(
            f"{who}: batch size {batch} is not a multiple of loss_norm_group {g} "
            "(model config train_cfg.loss_norm_group)"
        )
    num = num_per_img.reshape(-1, g).sum(1)
    den = den_per_img.reshape(-1, g).sum(1)
    return jnp.mean(num / jnp.maximum(den, 1.0))


def top_candidates(key: Array, k: int, *arrays: Array) -> tuple[Array, ...]:
    """mmdetection's per-level `nms_pre` selection: the `k` entries along axis 1 with the
    largest `key` `[B, N]` (equal keys: lower index first, as `lax.top_k`), gathered from each
    of `arrays` (`[B, N, ...]`)."""
    _, idx = jax.lax.top_k(key, k)  # [B, k]
    return tuple(
        jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1) for a in arrays
    )


def batched_multiclass_nms(
    boxes: Array,
    scores: Array,
    *,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
    max_candidates: int,
) -> dict[str, Array]:
    """`multiclass_nms` of each image (`boxes [B, M, 4]`, sigmoid `scores [B, M, C]`, no score
    factors) without its `index`: dict(boxes `[B, K, 4]`, scores, labels, valid `[B, K]`)."""
    return jax.vmap(
        lambda b, s: without_index(
            nms_ops.multiclass_nms(
                b,
                s,
                None,
                score_thr=score_thr,
                iou_threshold=iou_threshold,
                max_num=max_num,
                max_candidates=max_candidates,
            )
        )
    )(boxes, scores)


def without_index(dets: dict[str, Array]) -> dict[str, Array]:
    """`multiclass_nms`'s output less its `index`: the detector API's keys (boxes, scores,
    labels, valid)."""
    return {k: v for k, v in dets.items() if k != "index"}

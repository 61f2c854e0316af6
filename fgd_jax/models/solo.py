"""SOLO (mmdetection 2.x `SOLO` + `SOLOHead`, `solo_r50_fpn_1x_coco`), NHWC, static shapes.

Pieces (parameter names as mmdetection's): `backbone` (ResNet, C2..C5) -> `neck` (FPN,
start_level 0, 5 outputs, P6 by max-pool) -> `mask_head` (`SOLOHead`): the head resizes P2 to
P3's size and P6 to P5's (bilinear), so the levels have strides (8, 8, 16, 32, 32).
- Mask branch (`mask_convs_{i}`, GN): the level's map plus 2 CoordConv channels (x then y,
  `linspace(-1, 1)` over the whole canvas), 7 conv3x3-GN-ReLU, bilinear x2 upsample,
  `conv_mask_list_{l}` 1x1 to S_l^2 channels (`num_grids` 40, 36, 24, 16, 12): the mask
  logits of grid cell `i * S + j` at strides (4, 4, 8, 16, 16).
- Category branch (`cls_convs_{i}`): the map resized to S x S (bilinear), 7 conv3x3-GN-ReLU,
  `conv_cls` 3x3 sigmoid logits `[B, S, S, C]`.

Targets (`solo_targets`, mmdetection `_get_targets_single`): a GT belongs to every level whose
`scale_ranges` (both ends inclusive) hold `sqrt(w h)` of its box; its mass centre (pixel
index units) falls into cell `(trunc(cy / H * S), trunc(cx / W * S))`, H x W the canvas; the
positive cells are its centre region `pos_scale` x the half box sides around the mass centre
in cells, clipped to the centre cell +- 1; a later GT overwrites an earlier one's cells. The
mask target of a positive cell is its GT's full-canvas bitmap at the level's mask stride.
mmdetection rescales the full bitmap (`mmcv.imrescale(mask, 1 / stride)`); the batch carries
per-GT 56 x 56 grids over `mask_regions` instead (docs/contracts.md), so the masks are rebuilt
from the grids by `fgd_jax.ops.solo.grid_masks_at_stride` (same sample points, the bitmap
read through the grid, threshold 0.375) and the mass centre by `grid_center_of_mass`: with
56 x 56 grids, mean mask IoU 0.994 against mmdetection's at strides 4, 8, 16 (large objects
0.987), mass centres within 0.4 px, the centre cell the same in 99.9% of cases
(benchmarks/results/solo_targets_cpu.md). A GT whose grid is all zero is skipped
(mmdetection: an empty bitmap).

Losses (`solo_loss`): Dice (`loss_mask`, weight 3) over the positive cells of every level /
num_pos; sigmoid focal loss (`loss_cls`) over every cell and class / (num_pos + 1); counts per
group of `train_cfg.loss_norm_group` images (mmdetection: per GPU), groups averaged.

Inference (`solo_postprocess`, mmdetection `SOLOHead.get_results` / `_get_results_single`):
category scores `sigmoid * (2x2 local maximum)`, (cell, class) pairs with score > `score_thr`
(the best `max_candidates` of them: mmdetection takes all), mask probabilities upsampled to
stride 4, `> mask_thr`, kept when the mask area (stride-4 pixels) > the level's stride,
rescored by the maskness (mean probability inside the mask), best `nms_pre` to matrix NMS
(Gaussian, sigma 2), decayed scores >= `filter_thr`, the best `max_per_img`. `predict` gives
the detections' stride-4 mask probabilities `mask_probs_canvas [B, K, H/4, W/4]`; the host
pastes them into the original image (`paste_detections`: x4 to the canvas, crop to
`img_shape`, bilinear to the original size, `> mask_thr`, mmdetection's two
`F.interpolate`s as one composed linear map). mmdetection's SOLO returns dummy zero boxes;
`predict` gives the boxes of the stride-4 masks (`> mask_thr`) in original pixels instead,
so the bbox metrics of a SOLO run are of mask-derived boxes.

Canvas: mmdetection's grid cells, CoordConv channels and upsampled size span its batch tensor
(the largest padded image of the per-GPU batch); ours span the fixed canvas. They agree
when the canvas is the image's padded shape (one image per canvas bucket).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgd_jax.models.dense_heads import group_mean
from fgd_jax.models.layers import ConvModule, max_pool_torch
from fgd_jax.models.single_stage import SingleStageDetector
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops import solo as solo_ops

Array = jax.Array

DEFAULT_STRIDES = (8, 8, 16, 32, 32)
DEFAULT_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
DEFAULT_NUM_GRIDS = (40, 36, 24, 16, 12)
MASK_STRIDE = 4  # the mask logits of the finest levels; test-time masks are all at stride 4


# ------------------------------------------------------------------------------------ head
def coord_channels(batch: int, h: int, w: int, dtype: Any) -> Array:
    """mmdetection `generate_coordinate`: `[B, h, w, 2]` (x, y), each `linspace(-1, 1)`."""
    x = jnp.linspace(-1.0, 1.0, w, dtype=jnp.float32)
    y = jnp.linspace(-1.0, 1.0, h, dtype=jnp.float32)
    xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return jnp.broadcast_to(xy[None], (batch, h, w, 2)).astype(dtype)


class Conv1x1(nn.Module):
    """A 1x1 conv with bias as a matmul over channels (`kernel [1, 1, Cin, Cout]` HWIO, `bias`:
    `nn.Conv`'s parameters; XLA:CPU runs it and its gradients as GEMMs, see
    `models.layers.PointwiseConv`); kernel init N(0, 0.01), bias `bias_init`."""

    features: int
    bias_init: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.01), (1, 1, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
        dt = self.dtype or x.dtype
        y = jnp.einsum("bhwc,cd->bhwd", x.astype(dt), kernel[0, 0].astype(dt))
        return y + bias.astype(dt)


class SOLOHead(nn.Module):
    """mmdetection 2.x `SOLOHead` (module docstring).

    Attributes:
      num_classes: foreground classes (sigmoid). in_channels: FPN channels (checked).
      feat_channels / stacked_convs: tower width / depth (7 in SOLO's configs).
      strides: per level after the resize (8, 8, 16, 32, 32); the mask logits are at half.
      scale_ranges: per level (lo, hi) of a GT's `sqrt(w h)`, pixels, both inclusive.
      pos_scale: the centre region's fraction of the half box sides.
      num_grids: S per level. cls_down_index: the category tower's conv before which the map is
        resized to S x S. num_groups: GroupNorm groups. prior_prob: bias init of `conv_cls` and
        `conv_mask_list_{l}`. focal_gamma / focal_alpha / dice_eps and the loss weights: the
        losses' settings (read by `solo_loss`).
    Call: tuple of 5 NHWC FPN maps -> (mask_preds: per level `[B, 2 h_l, 2 w_l, S_l^2]`
      logits (h_l, w_l the resized level's size), cls_preds: per level `[B, S_l, S_l, C]`
      logits), float32.
    """

    num_classes: int
    in_channels: int | None = None
    feat_channels: int = 256
    stacked_convs: int = 7
    strides: Sequence[int] = DEFAULT_STRIDES
    scale_ranges: Sequence[tuple[float, float]] = DEFAULT_SCALE_RANGES
    pos_scale: float = 0.2
    num_grids: Sequence[int] = DEFAULT_NUM_GRIDS
    cls_down_index: int = 0
    num_groups: int = 32
    prior_prob: float = 0.01
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    dice_eps: float = 1e-3
    loss_mask_weight: float = 3.0
    loss_cls_weight: float = 1.0
    dtype: Any = None

    @nn.compact
    def __call__(self, feats: Sequence[Array]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        n = len(self.strides)
        if not len(feats) == n == len(self.num_grids) == len(self.scale_ranges):
            raise ValueError(
                f"SOLOHead: {len(feats)} maps, {n} strides, {len(self.num_grids)} num_grids, "
                f"{len(self.scale_ranges)} scale_ranges"
            )
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"SOLOHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config head.in_channels vs neck)"
            )
        init = nn.initializers.normal(0.01)
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)

        def tower(prefix: str) -> list[ConvModule]:
            return [
                ConvModule(
                    self.feat_channels,
                    3,
                    norm="gn",
                    num_groups=self.num_groups,
                    act=True,
                    dtype=self.dtype,
                    kernel_init=init,
                    name=f"{prefix}_{i}",
                )
                for i in range(self.stacked_convs)
            ]

        mask_convs, cls_convs = tower("mask_convs"), tower("cls_convs")
        conv_masks = [
            Conv1x1(s * s, bias, dtype=self.dtype, name=f"conv_mask_list_{lvl}")
            for lvl, s in enumerate(self.num_grids)
        ]
        conv_cls = nn.Conv(
            self.num_classes,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=init,
            bias_init=nn.initializers.constant(bias),
            name="conv_cls",
        )
        feats = resize_feats(feats)
        mask_preds, cls_preds = [], []
        for lvl, x in enumerate(feats):
            b, h, w, _ = x.shape
            m = jnp.concatenate([x, coord_channels(b, h, w, x.dtype)], axis=-1)
            for conv in mask_convs:
                m = conv(m)
            m = solo_ops.resize_bilinear(m, (2 * h, 2 * w), scale=2.0).astype(x.dtype)
            mp = conv_masks[lvl](m)
            mask_preds.append(mp.astype(dtypes.float_dtype(mp)))
            c = x
            s = self.num_grids[lvl]
            for j, conv in enumerate(cls_convs):
                if j == self.cls_down_index:
                    c = solo_ops.resize_bilinear(c, (s, s)).astype(x.dtype)
                c = conv(c)
            cp = conv_cls(c)
            cls_preds.append(cp.astype(dtypes.float_dtype(cp)))
        return tuple(mask_preds), tuple(cls_preds)


def resize_feats(feats: Sequence[Array]) -> list[Array]:
    """mmdetection `SOLOHead.resize_feats`: the first map bilinearly resized to the second's
    size, the last to the one before it, the others unchanged."""
    out = list(feats)
    out[0] = solo_ops.resize_bilinear(feats[0], feats[1].shape[1:3]).astype(feats[0].dtype)
    out[-1] = solo_ops.resize_bilinear(feats[-1], feats[-2].shape[1:3]).astype(feats[-1].dtype)
    return out


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class SOLOTrainCfg:
    """Training settings (model config `train_cfg`): `loss_norm_group` images share one
    num_pos normaliser (mmdetection's images per GPU; `<= 0`: the whole batch)."""

    loss_norm_group: int = 0


@dataclasses.dataclass(frozen=True)
class SOLOTestCfg:
    """mmdetection SOLO `test_cfg` (module docstring), plus `max_candidates`: the (cell, class)
    pairs above `score_thr` whose masks are computed, the best by category score
    (mmdetection: all of them; the result is the same whenever fewer pass the threshold)."""

    nms_pre: int = 500
    score_thr: float = 0.1
    mask_thr: float = 0.5
    filter_thr: float = 0.05
    kernel: str = "gaussian"
    sigma: float = 2.0
    max_per_img: int = 100
    max_candidates: int = 1000


_HEAD = SOLOHead(num_classes=1)
_TEST = SOLOTestCfg()


# ---------------------------------------------------------------------------------- targets
def solo_cell_targets(
    gt_boxes: Array,
    gt_labels: Array,
    gt_ok: Array,
    center_h: Array,
    center_w: Array,
    upsampled_hw: tuple[float, float],
    num_classes: int,
    scale_ranges: Sequence[tuple[float, float]] = _HEAD.scale_ranges,
    num_grids: Sequence[int] = _HEAD.num_grids,
    pos_scale: float = _HEAD.pos_scale,
) -> dict[str, list[Array]]:
    """The grid cells of ONE image's GTs (mmdetection 2.x `_get_targets_single` without the
    masks).

    Args: gt_boxes `[G, 4]` xyxy; gt_labels `[G] int`; gt_ok `[G] bool` (valid and a non-empty
      mask); center_h / center_w `[G]` mass centres (pixel-index units); upsampled_hw: 4 x the
      finest mask logits' size (mmdetection's `upsampled_size`, the canvas).
    Returns: per-level lists `labels` `[S^2] int32` (class or `num_classes`), `pos` `[S^2]
      bool`, `gt_ind` `[S^2] int32` (the GT of each cell, 0 where negative).
    """
    dt = dtypes.float_dtype(gt_boxes)
    boxes = gt_boxes.astype(dt)
    center_h, center_w = center_h.astype(jnp.float32), center_w.astype(jnp.float32)
    up_h, up_w = float(upsampled_hw[0]), float(upsampled_hw[1])
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    areas = jnp.sqrt(bw * bh)
    g = boxes.shape[0]
    pos_w = (0.5 * bw * pos_scale).astype(jnp.float32)
    pos_h = (0.5 * bh * pos_scale).astype(jnp.float32)
    out: dict[str, list] = dict(labels=[], pos=[], gt_ind=[])
    for (lo, hi), s in zip(scale_ranges, num_grids, strict=True):
        hit = gt_ok & (areas >= lo) & (areas <= hi)
        inv = np.float32(1.0 / s)

        def cell(v: Array, size: float, inv: np.float32 = inv) -> Array:
            return jnp.trunc((v / np.float32(size)) / inv).astype(jnp.int32)

        coord_w, coord_h = cell(center_w, up_w), cell(center_h, up_h)
        top = jnp.maximum(jnp.maximum(0, cell(center_h - pos_h, up_h)), coord_h - 1)
        down = jnp.minimum(jnp.minimum(s - 1, cell(center_h + pos_h, up_h)), coord_h + 1)
        left = jnp.maximum(jnp.maximum(0, cell(center_w - pos_w, up_w)), coord_w - 1)
        right = jnp.minimum(jnp.minimum(s - 1, cell(center_w + pos_w, up_w)), coord_w + 1)
        ii = jnp.arange(s)
        in_y = (ii[None, :] >= top[:, None]) & (ii[None, :] <= down[:, None])  # [G, S]
        in_x = (ii[None, :] >= left[:, None]) & (ii[None, :] <= right[:, None])
        cover = (in_y[:, :, None] & in_x[:, None, :] & hit[:, None, None]).reshape(g, s * s)
        # the last covering GT wins (mmdetection writes the GTs in order)
        rank = jnp.where(cover, jnp.arange(1, g + 1, dtype=jnp.int32)[:, None], 0)
        winner = rank.max(axis=0)
        pos = winner > 0
        ind = jnp.maximum(winner - 1, 0)
        labels = jnp.where(pos, jnp.asarray(gt_labels, jnp.int32)[ind], num_classes)
        out["labels"].append(labels.astype(jnp.int32))
        out["pos"].append(pos)
        out["gt_ind"].append(ind.astype(jnp.int32))
    return out


def solo_targets(
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    grids: Array,
    regions: Array,
    mask_shapes: Sequence[tuple[int, int]],
    num_classes: int,
    strides: Sequence[int] = _HEAD.strides,
    scale_ranges: Sequence[tuple[float, float]] = _HEAD.scale_ranges,
    num_grids: Sequence[int] = _HEAD.num_grids,
    pos_scale: float = _HEAD.pos_scale,
) -> dict[str, Any]:
    """Targets of ONE image (vmap for a batch) from the batch's mask grids: mass centres by
    `grid_center_of_mass`, masks at each level's mask stride by `grid_masks_at_stride`, then
    `solo_cell_targets`.

    Args: gt_boxes `[G, 4]` xyxy canvas pixels; gt_labels `[G] int`; gt_valid `[G] bool`;
      grids `[G, M, M]` / regions `[G, 4]`: the batch's `masks` / `mask_regions`; mask_shapes:
      per level (h, w) of the mask logits (stride `strides[l] / 2`).
    Returns: `solo_cell_targets`' lists plus `masks`: per level `[G, h_l, w_l]` 0/1 (every
      GT's bitmap at the level's mask stride).
    """
    dt = dtypes.float_dtype(gt_boxes)
    regions = regions.astype(dt)
    center_h, center_w, nonempty = solo_ops.grid_center_of_mass(grids, regions)
    up = (mask_shapes[0][0] * 4, mask_shapes[0][1] * 4)
    out: dict[str, Any] = solo_cell_targets(
        gt_boxes, gt_labels, gt_valid & nonempty, center_h, center_w, up, num_classes,
        scale_ranges, num_grids, pos_scale,
    )  # fmt: skip
    by_stride: dict[int, Array] = {}
    out["masks"] = []
    for stride, shape in zip(strides, mask_shapes, strict=True):
        s = int(stride) // 2
        if s not in by_stride:
            by_stride[s] = solo_ops.grid_masks_at_stride(
                grids, regions, (int(shape[0]), int(shape[1])), s
            )
        out["masks"].append(by_stride[s])
    return out


# ------------------------------------------------------------------------------------ loss
def solo_loss(
    mask_preds: Sequence[Array],
    cls_preds: Sequence[Array],
    targets: dict[str, Any],
    num_classes: int,
    loss_norm_group: int = 0,
    focal_gamma: float = _HEAD.focal_gamma,
    focal_alpha: float = _HEAD.focal_alpha,
    dice_eps: float = _HEAD.dice_eps,
    loss_mask_weight: float = _HEAD.loss_mask_weight,
    loss_cls_weight: float = _HEAD.loss_cls_weight,
) -> dict[str, Array]:
    """mmdetection 2.x `SOLOHead.loss` for a batch.

    Args: mask_preds / cls_preds: per level `[B, h, w, S^2]` / `[B, S, S, C]` logits;
      targets: `solo_targets` of every image (batched: `labels` / `pos` / `gt_ind` `[B, S^2]`,
      `masks` `[B, G, h, w]` per level).
    Returns: dict(loss_mask, loss_cls). The Dice terms come from per-cell sums: `sum(p t)` is
      the prediction contracted with every GT's mask, then read at the cell's GT, so no
      `[S^2, h, w]` target tensor is built.
    """
    dt = dtypes.float_dtype(*mask_preds, *cls_preds)
    dice_sum, num_pos, focal_sum = [], [], []
    for lvl, (mp, cp) in enumerate(zip(mask_preds, cls_preds, strict=True)):
        p = jax.nn.sigmoid(mp.astype(dt))  # [B, h, w, S^2]
        masks = jax.lax.stop_gradient(targets["masks"][lvl].astype(dt))  # [B, G, h, w]
        inter_all = jnp.einsum("bhwc,bghw->bgc", p, masks)  # [B, G, S^2]
        ind = targets["gt_ind"][lvl]
        pos = targets["pos"][lvl]
        inter = jnp.take_along_axis(inter_all, ind[:, None, :], axis=1)[:, 0]
        t_sq = jnp.take_along_axis(masks.sum((2, 3)), ind, axis=1)  # [B, S^2]
        p_sq = jnp.sum(p * p, axis=(1, 2))
        dice = solo_ops.dice_from_sums(inter, p_sq, t_sq, eps=dice_eps)
        dice_sum.append(jnp.sum(jnp.where(pos, dice, 0.0), axis=1))
        num_pos.append(jnp.sum(pos, axis=1).astype(dt))
        b = cp.shape[0]
        onehot = jax.nn.one_hot(targets["labels"][lvl], num_classes, dtype=dt)  # bg -> zeros
        fl = loss_ops.sigmoid_focal_loss(
            cp.astype(dt).reshape(b, -1, num_classes), onehot, focal_gamma, focal_alpha
        )
        focal_sum.append(fl.sum((1, 2)))
    dice_img = sum(dice_sum)
    pos_img = sum(num_pos)
    focal_img = sum(focal_sum)
    who = "SOLO loss"
    loss_mask = group_mean(dice_img, pos_img, loss_norm_group, who)
    # (num_pos + 1) per group: the +1 once per group, as mmdetection once per GPU
    b = dice_img.shape[0]
    g = b if loss_norm_group <= 0 else loss_norm_group
    plus_one = (jnp.arange(b) % g == 0).astype(dt)
    loss_cls = group_mean(focal_img, pos_img + plus_one, loss_norm_group, who)
    return dict(loss_mask=loss_mask_weight * loss_mask, loss_cls=loss_cls_weight * loss_cls)


# ------------------------------------------------------------------------------- inference
def local_max_scores(cls_logits: Array) -> Array:
    """`sigmoid(x) * (x's sigmoid equals the max of its 2x2 window ending at it)`: mmdetection's
    `max_pool2d(k=2, s=1, p=1)[:-1, :-1] == score`, NHWC `[B, S, S, C]`."""
    scores = jax.nn.sigmoid(cls_logits)
    pooled = max_pool_torch(scores, 2, 1, 1)[:, :-1, :-1]
    return scores * (pooled == scores)


def solo_postprocess(
    mask_preds: Sequence[Array],
    cls_preds: Sequence[Array],
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    strides: Sequence[int] = _HEAD.strides,
    test_cfg: SOLOTestCfg = _TEST,
) -> dict[str, Array]:
    """mmdetection 2.x `SOLOHead.get_results` (module docstring), static shapes.

    Args: mask_preds / cls_preds: per level `[B, h, w, S^2]` / `[B, S, S, C]` logits (training
      layout); img_shape `[B, 2]`; scale_factor `[B, 4]`.
    Returns: dict(scores `[B, K]`, labels `[B, K] int32`, valid `[B, K] bool`,
      mask_probs_canvas `[B, K, H/4, W/4]` float32 (the probabilities at stride 4 over the
      canvas), boxes `[B, K, 4]` of the stride-4 masks in ORIGINAL image pixels), K =
      `max_per_img`, sorted by decayed score.
    """
    tc = test_cfg
    dt = dtypes.float_dtype(*mask_preds, *cls_preds)
    batch = cls_preds[0].shape[0]
    out_h, out_w = mask_preds[0].shape[1:3]  # stride 4: the finest level's mask logits
    scores = jnp.concatenate(
        [local_max_scores(c.astype(dt)).reshape(batch, -1, num_classes) for c in cls_preds],
        axis=1,
    )  # [B, N, C]
    counts = [int(c.shape[1] * c.shape[2]) for c in cls_preds]
    offsets = np.cumsum([0, *counts])
    cell_stride = np.concatenate(
        [np.full(n, s, np.float32) for n, s in zip(counts, strides, strict=True)]
    )
    cell_level = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(counts)])
    k1 = min(int(tc.max_candidates), scores.shape[1] * num_classes)
    flat = scores.reshape(batch, -1)
    top, idx = jax.lax.top_k(jnp.where(flat > tc.score_thr, flat, -1.0), k1)
    cand_ok = top > tc.score_thr
    cell = idx // num_classes
    label = (idx % num_classes).astype(jnp.int32)
    level = jnp.asarray(cell_level)[cell]
    # each candidate's mask probabilities at stride 4 (bilinear is linear: gather, then resize)
    probs = jnp.zeros((batch, k1, out_h, out_w), dt)
    for lvl, mp in enumerate(mask_preds):
        ch = jnp.clip(cell - offsets[lvl], 0, counts[lvl] - 1)
        m = jnp.take_along_axis(mp.astype(dt), ch[:, None, None, :], axis=3)  # [B, h, w, k1]
        m = solo_ops.resize_bilinear(jax.nn.sigmoid(m), (out_h, out_w))
        probs = jnp.where((level == lvl)[:, :, None, None], jnp.moveaxis(m, 3, 1), probs)
    binary = probs > tc.mask_thr
    area = binary.sum((2, 3)).astype(dt)
    keep = cand_ok & (area > jnp.asarray(cell_stride)[cell])
    maskness = jnp.sum(probs * binary, axis=(2, 3)) / jnp.maximum(area, 1.0)
    rescored = jnp.where(keep, top * maskness, -1.0)
    k2 = min(int(tc.nms_pre), k1)
    best, pick = jax.lax.top_k(rescored, k2)  # mmdetection: sort, keep nms_pre
    pre_ok = best > -1.0

    def one(bin_i, lab_i, sc_i, ok_i, area_i):
        return solo_ops.matrix_nms(
            bin_i,
            lab_i,
            sc_i,
            ok_i,
            mask_area=area_i,
            kernel=tc.kernel,
            sigma=tc.sigma,
            filter_thr=tc.filter_thr,
            max_num=tc.max_per_img,
        )

    take = lambda a: jnp.take_along_axis(a, pick.reshape(*pick.shape, *(1,) * (a.ndim - 2)), 1)  # noqa: E731
    res = jax.vmap(one)(take(binary), take(label), best, pre_ok, take(area))
    sel = jnp.take_along_axis(pick, res["index"], axis=1)  # into the k1 candidates
    mprobs = jnp.take_along_axis(probs, sel[:, :, None, None], axis=1)
    mprobs = jnp.where(res["valid"][:, :, None, None], mprobs, 0.0)
    boxes = mask_boxes(mprobs > tc.mask_thr, MASK_STRIDE, img_shape, scale_factor)
    return dict(
        boxes=jnp.where(res["valid"][..., None], boxes, 0.0),
        scores=res["scores"],
        labels=res["labels"],
        valid=res["valid"],
        mask_probs_canvas=mprobs.astype(jnp.float32),
    )


def mask_boxes(binary: Array, stride: int, img_shape: Array, scale_factor: Array) -> Array:
    """`[B, K, 4]` xyxy boxes of binary masks `[B, K, h, w]` at `stride` (cells times the
    stride, clipped to `img_shape`), divided by `scale_factor` (original image pixels)."""
    dt = jnp.float32
    h, w = binary.shape[-2:]
    ys = binary.any(-1)
    xs = binary.any(-2)
    iy = jnp.arange(h, dtype=dt)
    ix = jnp.arange(w, dtype=dt)
    y0 = jnp.min(jnp.where(ys, iy, h), -1)
    y1 = jnp.max(jnp.where(ys, iy + 1, 0), -1)
    x0 = jnp.min(jnp.where(xs, ix, w), -1)
    x1 = jnp.max(jnp.where(xs, ix + 1, 0), -1)
    boxes = jnp.stack([x0, y0, x1, y1], -1) * stride
    img = jnp.asarray(img_shape, dt)[:, None, :]
    lim = jnp.stack([img[..., 1], img[..., 0], img[..., 1], img[..., 0]], -1)
    boxes = jnp.clip(boxes, 0.0, lim)
    return boxes / jnp.asarray(scale_factor, dt)[:, None, :]


def paste_masks_np(
    probs: np.ndarray, img_hw: tuple[int, int], orig_hw: tuple[int, int], thr: float = 0.5
) -> np.ndarray:
    """Stride-4 canvas mask probabilities `[n, h4, w4]` -> `[n, *orig_hw]` bool: mmdetection's
    `F.interpolate(size=4 x (h4, w4))[:h, :w]` then `F.interpolate(size=orig_hw)` (both
    bilinear, `align_corners=False`) composed into one matrix per axis, `> thr`."""
    probs = np.asarray(probs, np.float32)
    n, h4, w4 = probs.shape
    h, w = int(img_hw[0]), int(img_hw[1])
    oh, ow = int(orig_hw[0]), int(orig_hw[1])
    if n == 0:
        return np.zeros((0, oh, ow), bool)
    ay = solo_ops.bilinear_matrix(h, oh) @ solo_ops.bilinear_matrix(h4, 4 * h4)[:h]
    ax = solo_ops.bilinear_matrix(w, ow) @ solo_ops.bilinear_matrix(w4, 4 * w4)[:w]
    return np.matmul(np.matmul(ay[None], probs), ax.T[None]) > thr


def paste_detections(det: dict[str, Any], i: int, orig_hw: tuple[int, int]) -> np.ndarray:
    """Image `i`'s valid detections' masks `[n, *orig_hw]` bool from `SOLO.predict`'s
    `mask_probs_canvas`, `img_shape` and `mask_thr` (as the evaluation passes them)."""
    valid = np.asarray(det["valid"][i])
    probs = np.asarray(det["mask_probs_canvas"][i])[valid]
    img_hw = tuple(int(v) for v in np.asarray(det["img_shape"][i]))
    thr = float(np.asarray(det["mask_thr"][i])) if "mask_thr" in det else _TEST.mask_thr
    return paste_masks_np(probs, img_hw, orig_hw, thr)


# -------------------------------------------------------------------------------- detector
class SOLO(SingleStageDetector):
    """mmdetection 2.x `SOLO` implementing the detector API of docs/contracts.md (module
    docstring). Groups: `backbone`, `neck`, `head` (-> `mask_head`, a `SOLOHead`),
    `train_cfg` (`SOLOTrainCfg`), `test_cfg` (`SOLOTestCfg`)."""

    backbone: nn.Module
    neck: nn.Module
    mask_head: SOLOHead
    train_cfg: SOLOTrainCfg = SOLOTrainCfg()
    test_cfg: SOLOTestCfg = SOLOTestCfg()

    KIND = "solo"
    HEAD = SOLOHead
    TRAIN_CFG = SOLOTrainCfg
    TEST_CFG = SOLOTestCfg
    HEAD_FIELD = "mask_head"

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features, mask_preds, cls_scores), see `SOLOHead`."""
        feats = self.extract_feat(images, train=train)
        mask_preds, cls_preds = self.mask_head(feats)
        return dict(features=feats, mask_preds=mask_preds, cls_scores=cls_preds)

    def targets(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Any]:
        """`solo_targets` of every image of `batch` for head outputs `outs`."""
        head = self.mask_head
        shapes = tuple(tuple(int(v) for v in m.shape[1:3]) for m in outs["mask_preds"])
        boxes = jnp.asarray(batch["boxes"], dtypes.float_dtype(batch["boxes"]))
        return jax.vmap(
            lambda b, lab, v, g, r: solo_targets(
                b,
                lab,
                v,
                g,
                r,
                shapes,
                head.num_classes,
                head.strides,
                head.scale_ranges,
                head.num_grids,
                head.pos_scale,
            )
        )(boxes, batch["labels"], batch["valid"], batch["masks"], batch["mask_regions"])

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch with masks."""
        for key in ("boxes", "labels", "valid", "masks", "mask_regions"):
            if key not in batch:
                raise KeyError(
                    f"SOLO.forward_train: batch has no {key!r}; train with data.with_mask=True "
                    "(docs/contracts.md)"
                )
        head = self.mask_head
        t = jax.lax.stop_gradient(self.targets(outs, batch))
        return solo_loss(
            outs["mask_preds"],
            outs["cls_scores"],
            t,
            head.num_classes,
            loss_norm_group=self.train_cfg.loss_norm_group,
            focal_gamma=head.focal_gamma,
            focal_alpha=head.focal_alpha,
            dice_eps=head.dice_eps,
            loss_mask_weight=head.loss_mask_weight,
            loss_cls_weight=head.loss_cls_weight,
        )

    def predict(self, images: Array, img_shape: Array, scale_factor: Array) -> dict[str, Array]:
        """Detections: dict(boxes [B,K,4] (of the masks, ORIGINAL pixels), scores [B,K],
        labels [B,K] int32, valid [B,K] bool, mask_probs_canvas [B,K,H/4,W/4], img_shape
        [B,2], mask_thr [B]: what `paste_detections` needs)."""
        det = super().predict(images, img_shape, scale_factor)
        det["img_shape"] = jnp.asarray(img_shape, jnp.int32)
        det["mask_thr"] = jnp.full(det["valid"].shape[:1], self.test_cfg.mask_thr, jnp.float32)
        return det

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`solo_postprocess` with this model's settings on `__call__` outputs."""
        return solo_postprocess(
            outs["mask_preds"],
            outs["cls_scores"],
            img_shape,
            scale_factor,
            self.num_classes,
            self.mask_head.strides,
            self.test_cfg,
        )

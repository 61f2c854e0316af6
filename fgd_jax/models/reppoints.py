"""RepPoints (moment transform) with mmdetection 2.x (2.11) semantics, NHWC, Flax Linen, static
shapes under jit.

Pieces (parameter names as mmdetection, see docs/contracts.md):
- `backbone` (ResNet / ResNeXt, DCN allowed) -> `neck` (FPN, start_level 1,
  `add_extra_convs='on_input'`, 5 levels; the `gn-neck` configs put GroupNorm after every FPN
  conv) -> `bbox_head` (`RepPointsHead`).
- Head: two towers `cls_convs_{i}` / `reg_convs_{i}` of 3x3 conv (+ GN) + ReLU; from the reg
  tower `reppoints_pts_init_conv` (3x3) + ReLU + `reppoints_pts_init_out` (1x1) predict 9
  points per cell, `(dy, dx)` per point in units of the level's stride, relative to the cell's
  point `(x * stride, y * stride)`. Those points, with their gradient scaled by
  `gradient_mul` and less the regular 3x3 grid (`dcn_base_offset`), are the offsets of the
  two deformable convs `reppoints_cls_conv` (on the cls tower, -> ReLU ->
  `reppoints_cls_out`, the class logits) and `reppoints_pts_refine_conv` (on the reg tower, ->
  ReLU -> `reppoints_pts_refine_out`, the refinement added to the detached init points).
- Points -> box, the moment transform (`points_to_boxes`): the points' mean, and half sizes
  `std * exp(moment_transfer)` (unbiased std over the 9 points, as `torch.std`), with the
  learnable `moment_transfer` [2] (w, h) whose gradient is scaled by `moment_mul`.
- Training (`reppoints_loss`, mmdetection 2.11 `RepPointsHead.loss`): init stage
  `PointAssigner(scale=4, pos_num=1)` on the cell points (`fgd_jax.ops.assign.point_assign`),
  refine stage `MaxIoUAssigner(0.5, 0.4, min_pos_iou=0)` on the init boxes (no gradient).
  `loss_cls`: sigmoid focal loss over the valid, not ignored points of the refine stage;
  `loss_pts_init` (x0.5) / `loss_pts_refine` (x1.0): smooth L1 (beta 0.11) between the
  predicted and GT boxes, both divided by `point_base_scale * stride`, on each stage's
  positives. Normalisers (PseudoSampler): `sum_i max(num_pos_i, 1)` of the refine stage for
  `loss_cls` and `loss_pts_refine`, of the init stage for `loss_pts_init`; per group of
  `loss_norm_group` images as RetinaNet (mmdetection's per-GPU normalisation).
- Inference (`reppoints_postprocess`, 2.11 `_get_bboxes_single`): per level the top `nms_pre`
  points by best class score, the refined boxes `box * stride + point`, clipped to
  `img_shape`, divided by `scale_factor`; `multiclass_nms` (score > 0.05, NMS 0.5, 100).

Points on the canvas padding: as mmdetection's valid flags (`point_valid_flags`, the per-image
pad shape `ceil(img_shape / size_divisor) * size_divisor`): outside it, points take no part in
either assignment or any loss. Padded GT slots are never assigned.

Distilled features: FGD hooks `neck.fpn_convs.{i}.conv`; with a GN neck that is the conv output
BEFORE its GroupNorm (`FPN(with_pre_norm=True)`), which `extract_feat`, `__call__`'s
`features` and `forward_train` return; the head runs on the normalised maps.

mmdetection 3.3 differs from 2.11 only in inference here (scripts/oracles/make_reppoints_golden.py):
3.3 keeps the top `nms_pre` (point, class) pairs above `score_thr` per level; 2.11 the top
`nms_pre` points by their best class score, then `multiclass_nms` thresholds.
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
from flax.linen.dtypes import promote_dtype

from fgd_jax.models.dense_heads import (
    DenseTestCfg,
    batched_multiclass_nms,
    flatten_levels,
    group_mean,
    point_valid_flags,
    top_candidates,
)
from fgd_jax.models.layers import head_tower
from fgd_jax.models.single_stage import SingleStageDetector
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import dtypes
from fgd_jax.ops import losses as loss_ops
from fgd_jax.ops.deform_conv import deform_conv2d

Array = jax.Array


# ------------------------------------------------------------------------- moment transform
def points_to_boxes(pts: Array, moment_transfer: Array, y_first: bool = True) -> Array:
    """mmdetection `RepPointsHead.points2bbox` with `transform_method='moment'`.

    Args: pts `[..., 2 * P]` (`(y, x)` pairs with `y_first`, else `(x, y)`); moment_transfer
      `[2]` (width, height) log factors (already gradient-scaled, see `RepPointsHead`).
    Returns `[..., 4]` xyxy: mean -/+ unbiased std * exp(moment_transfer). Where the points
    coincide (std 0) the std's gradient is 0 instead of torch's nan.
    """
    p = pts.reshape(*pts.shape[:-1], -1, 2)
    y, x = (p[..., 0], p[..., 1]) if y_first else (p[..., 1], p[..., 0])

    def mean_std(v: Array) -> tuple[Array, Array]:
        m = jnp.mean(v, axis=-1)
        var = jnp.sum((v - m[..., None]) ** 2, axis=-1) / (v.shape[-1] - 1)
        pos = var > 0
        return m, jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)

    mx, sx = mean_std(x)
    my, sy = mean_std(y)
    hw = sx * jnp.exp(moment_transfer[0])
    hh = sy * jnp.exp(moment_transfer[1])
    return jnp.stack([mx - hw, my - hh, mx + hw, my + hh], axis=-1)


def dcn_base_offset(num_points: int) -> np.ndarray:
    """The regular `k x k` grid of a `k = sqrt(num_points)` deformable conv as `[2 * P]`
    `(dy, dx)` pairs, kernel points row-major (mmdetection's `dcn_base_offset`)."""
    k = int(math.isqrt(num_points))
    base = np.arange(-(k // 2), k // 2 + 1, dtype=np.float64)
    return np.stack([np.repeat(base, k), np.tile(base, k)], axis=1).reshape(-1)


# ------------------------------------------------------------------------------------ head
class RepPointsHead(nn.Module):
    """mmdetection 2.11 `RepPointsHead` (moment transform, center init, no grid points).

    Attributes:
      num_classes: foreground classes (sigmoid focal loss, no background channel).
      in_channels: channels of the FPN maps (checked when set).
      feat_channels, point_feat_channels, stacked_convs: tower width, deformable conv width,
        tower depth.
      norm: None or 'gn' (the towers' norm; the `gn-neck+head` configs use GN(32)), num_groups.
      num_points: points per cell (an odd square: the deformable convs are `sqrt x sqrt`).
      gradient_mul: scale of the gradient flowing from the deformable convs into the init
        points. point_strides, point_base_scale: level strides; the assignment / loss scale.
      moment_mul: scale of `moment_transfer`'s gradient. prior_prob: `reppoints_cls_out` bias.
      focal_gamma, focal_alpha, loss_cls_weight, smooth_l1_beta, loss_init_weight,
        loss_refine_weight: the losses' settings (read by the detector).
    Init as mmdetection 2.11 (`normal_init(std=0.01)` of every conv, bias 0; the cls bias from
    `prior_prob`); `moment_transfer` 0.
    Call: tuple of NHWC maps `[B, H_l, W_l, in_ch]` -> (cls_scores `[B, H_l, W_l, C]` logits,
      pts_init, pts_refine `[B, H_l, W_l, 2 * P]` `(dy, dx)` per point in stride units, tuples
      over levels; moment_transfer `[2]`, gradient-scaled), float32 (float64 in a float64 run).
    """

    num_classes: int
    in_channels: int | None = None
    feat_channels: int = 256
    point_feat_channels: int = 256
    stacked_convs: int = 3
    norm: str | None = "gn"
    num_groups: int = 32
    num_points: int = 9
    gradient_mul: float = 0.1
    point_strides: Sequence[int] = (8, 16, 32, 64, 128)
    point_base_scale: int = 4
    moment_mul: float = 0.01
    prior_prob: float = 0.01
    # losses
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    loss_cls_weight: float = 1.0
    smooth_l1_beta: float = 0.11
    loss_init_weight: float = 0.5
    loss_refine_weight: float = 1.0
    dtype: Any = None

    @nn.compact
    def __call__(
        self, feats: Sequence[Array]
    ) -> tuple[tuple[Array, ...], tuple[Array, ...], tuple[Array, ...], Array]:
        if len(feats) != len(self.point_strides):
            raise ValueError(
                f"RepPointsHead: {len(feats)} feature maps but {len(self.point_strides)} strides"
            )
        if self.in_channels is not None and feats[0].shape[-1] != self.in_channels:
            raise ValueError(
                f"RepPointsHead: in_channels {self.in_channels} but the maps have "
                f"{feats[0].shape[-1]} channels (model config head.in_channels vs neck)"
            )
        k = math.isqrt(self.num_points)
        if k * k != self.num_points or k % 2 == 0:
            raise ValueError(f"RepPointsHead: num_points {self.num_points} must be an odd square")
        init = nn.initializers.normal(0.01)

        def tower(prefix: str) -> list:
            return head_tower(
                prefix,
                self.stacked_convs,
                self.feat_channels,
                dtype=self.dtype,
                kernel_init=init,
                norm=self.norm,
                num_groups=self.num_groups,
                use_bias=self.norm is None,
            )

        def conv(feat: int, size: int, name: str, bias: float = 0.0) -> nn.Conv:
            pad = size // 2
            return nn.Conv(
                feat,
                (size, size),
                padding=((pad, pad), (pad, pad)),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=init,
                bias_init=nn.initializers.constant(bias),
                name=name,
            )

        cls_convs, reg_convs = tower("cls_convs"), tower("reg_convs")
        pts_dim = 2 * self.num_points
        bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
        cls_dcn = PointDeformConv(
            self.point_feat_channels, k, self.dtype, name="reppoints_cls_conv"
        )
        cls_out = conv(self.num_classes, 1, "reppoints_cls_out", bias_cls)
        init_conv = conv(self.point_feat_channels, 3, "reppoints_pts_init_conv")
        init_out = conv(pts_dim, 1, "reppoints_pts_init_out")
        ref_dcn = PointDeformConv(
            self.point_feat_channels, k, self.dtype, name="reppoints_pts_refine_conv"
        )
        ref_out = conv(pts_dim, 1, "reppoints_pts_refine_out")
        mt = self.param("moment_transfer", nn.initializers.zeros, (2,), jnp.float32)
        moment = mt * self.moment_mul + jax.lax.stop_gradient(mt) * (1 - self.moment_mul)

        base = jnp.asarray(dcn_base_offset(self.num_points), jnp.float32)
        g = self.gradient_mul
        cls_scores, pts_inits, pts_refines = [], [], []
        for x in feats:
            c = r = x
            for m in cls_convs:
                c = m(c)
            for m in reg_convs:
                r = m(r)
            pts_init = init_out(nn.relu(init_conv(r)))
            pts_init = pts_init.astype(dtypes.float_dtype(pts_init))
            grad_mul = (1 - g) * jax.lax.stop_gradient(pts_init) + g * pts_init
            offset = grad_mul - base.astype(grad_mul.dtype)
            cls = cls_out(nn.relu(cls_dcn(c, offset)))
            refine = ref_out(nn.relu(ref_dcn(r, offset)))
            refine = refine.astype(pts_init.dtype) + jax.lax.stop_gradient(pts_init)
            cls_scores.append(cls.astype(dtypes.float_dtype(cls)))
            pts_inits.append(pts_init)
            pts_refines.append(refine)
        return tuple(cls_scores), tuple(pts_inits), tuple(pts_refines), moment


class PointDeformConv(nn.Module):
    """mmcv `DeformConv2d` without bias, stride 1, padding `k // 2`, offsets given by the
    caller (RepPoints' points): `(x [B, H, W, Cin], offset [B, H, W, 2 * k * k]) ->
    [B, H, W, features]`. Parameter `kernel` `[k, k, Cin, features]` (HWIO)."""

    features: int
    kernel_size: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, offset: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.normal(0.01), (k, k, x.shape[-1], self.features), jnp.float32
        )
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return deform_conv2d(x, offset, kernel, padding=k // 2)


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class RepPointsTrainCfg:
    """Training settings (model config `train_cfg`): init stage `PointAssigner` (`init_scale`,
    `init_pos_num`), refine stage `MaxIoUAssigner` (`refine_pos_iou_thr`,
    `refine_neg_iou_thr`, `refine_min_pos_iou`), `size_divisor` of the point valid flags,
    `loss_norm_group` (module docstring; 0: the whole batch)."""

    init_scale: float = 4.0
    init_pos_num: int = 1
    refine_pos_iou_thr: float = 0.5
    refine_neg_iou_thr: float = 0.4
    refine_min_pos_iou: float = 0.0
    size_divisor: int = 32
    loss_norm_group: int = 0


_HEAD = RepPointsHead(num_classes=1)  # the field defaults, read by the functions below
_TRAIN = RepPointsTrainCfg()
_TEST = DenseTestCfg()


# ---------------------------------------------------------------------------------- points
def reppoints_points(
    feat_shapes: Sequence[tuple[int, int]], strides: Sequence[int] = _HEAD.point_strides
) -> tuple[Array, Array]:
    """mmdetection `PointGenerator` points of every level, concatenated finest first:
    (`[N, 2]` float32 (x, y) = (x * stride, y * stride), index `y * W + x` within a level;
    `[N]` float32 each point's stride)."""
    pts, strd = [], []
    for (h, w), s in zip(feat_shapes, strides, strict=True):
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pts.append(np.stack([xx.reshape(-1) * s, yy.reshape(-1) * s], axis=1))
        strd.append(np.full((h * w,), s))
    return (
        jnp.asarray(np.concatenate(pts), jnp.float32),
        jnp.asarray(np.concatenate(strd), jnp.float32),
    )


def pts_to_coords(pts: Array, points: Array, strides: Array) -> Array:
    """mmdetection `offset_to_pts`: `[..., N, 2P]` `(dy, dx)` stride units -> `[..., N, 2P]`
    `(x, y)` pixels, `shift * stride + point`."""
    p = pts.reshape(*pts.shape[:-1], -1, 2)
    xy = jnp.stack([p[..., 1], p[..., 0]], axis=-1) * strides[:, None, None]
    return (xy + points[:, None, :]).reshape(pts.shape)


def init_boxes(pts_init: Array, moment: Array, points: Array, strides: Array) -> Array:
    """The refine stage's proposals (2.11 `loss`): `points_to_boxes` of the init points (stride
    units, `(dy, dx)`) times the stride, plus the point: `[..., N, 4]` xyxy pixels."""
    box = points_to_boxes(pts_init, moment) * strides[:, None]
    return box + jnp.concatenate([points, points], axis=-1)


# ------------------------------------------------------------------------------------ loss
def reppoints_targets(
    points: Array,
    strides: Array,
    proposals: Array,
    point_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    init_scale: float = _TRAIN.init_scale,
    init_pos_num: int = _TRAIN.init_pos_num,
    refine_pos_iou_thr: float = _TRAIN.refine_pos_iou_thr,
    refine_neg_iou_thr: float = _TRAIN.refine_neg_iou_thr,
    refine_min_pos_iou: float = _TRAIN.refine_min_pos_iou,
) -> dict[str, Array]:
    """Targets of ONE image (vmap for a batch), mmdetection 2.11 `get_targets` of both stages.

    Args: points `[N, 2]`, strides `[N]` (`reppoints_points`); proposals `[N, 4]` the init
      boxes in pixels (`init_boxes`, no gradient); point_valid `[N]` bool; gt_boxes `[G, 4]`,
      gt_labels `[G] int32`, gt_valid `[G] bool`. ignore boxes: 2.11's RepPoints configs use
      no ignore (`ignore_iof_thr=-1`), they are not read.
    Returns: dict of `assigned_init`, `assigned_refine` `[N] int32` (`fgd_jax.ops.assign`
      encoding), `pos_init`, `pos_refine` `[N] bool`, `gt_init`, `gt_refine` `[N, 4]` (the
      GT box on positives, 0 elsewhere), `labels [N] int32` (refine stage; `num_classes` off
      the positives), `label_weights [N]` (1 on the refine stage's positives and negatives).
    """
    del ignore_boxes, ignore_valid
    dt = dtypes.float_dtype(gt_boxes, proposals)
    a_init = assign_ops.point_assign(
        points,
        strides,
        gt_boxes,
        gt_valid,
        scale=init_scale,
        pos_num=init_pos_num,
        point_valid=point_valid,
    )
    a_ref, _ = assign_ops.max_iou_assign(
        proposals,
        gt_boxes,
        gt_valid,
        refine_pos_iou_thr,
        refine_neg_iou_thr,
        min_pos_iou=refine_min_pos_iou,
        anchor_valid=point_valid,
    )
    last = gt_boxes.shape[0] - 1
    pos_i, pos_r = a_init >= 0, a_ref >= 0
    gt_i = jnp.where(pos_i[:, None], gt_boxes[jnp.clip(a_init, 0, last)], 0.0)
    gt_r = jnp.where(pos_r[:, None], gt_boxes[jnp.clip(a_ref, 0, last)], 0.0)
    labels = jnp.where(pos_r, gt_labels[jnp.clip(a_ref, 0, last)], num_classes)
    return dict(
        assigned_init=a_init,
        assigned_refine=a_ref,
        pos_init=pos_i,
        pos_refine=pos_r,
        gt_init=gt_i.astype(dt),
        gt_refine=gt_r.astype(dt),
        labels=labels.astype(jnp.int32),
        label_weights=(pos_r | (a_ref == assign_ops.NEGATIVE)).astype(dt),
    )


def reppoints_loss(
    cls_scores: Array,
    pts_init: Array,
    pts_refine: Array,
    moment: Array,
    points: Array,
    strides: Array,
    point_valid: Array,
    gt_boxes: Array,
    gt_labels: Array,
    gt_valid: Array,
    num_classes: int,
    point_base_scale: int = _HEAD.point_base_scale,
    focal_gamma: float = _HEAD.focal_gamma,
    focal_alpha: float = _HEAD.focal_alpha,
    loss_cls_weight: float = _HEAD.loss_cls_weight,
    smooth_l1_beta: float = _HEAD.smooth_l1_beta,
    loss_init_weight: float = _HEAD.loss_init_weight,
    loss_refine_weight: float = _HEAD.loss_refine_weight,
    init_scale: float = _TRAIN.init_scale,
    init_pos_num: int = _TRAIN.init_pos_num,
    refine_pos_iou_thr: float = _TRAIN.refine_pos_iou_thr,
    refine_neg_iou_thr: float = _TRAIN.refine_neg_iou_thr,
    refine_min_pos_iou: float = _TRAIN.refine_min_pos_iou,
    loss_norm_group: int = _TRAIN.loss_norm_group,
    return_targets: bool = False,
) -> dict[str, Array]:
    """mmdetection 2.11 `RepPointsHead.loss` over a batch (module docstring).

    Args:
      cls_scores `[B, N, C]` logits; pts_init / pts_refine `[B, N, 2P]` (`(dy, dx)` stride
        units; levels flattened, `flatten_levels`); moment `[2]` (the head's, gradient-scaled).
      points `[N, 2]`, strides `[N]` (`reppoints_points`); point_valid `[B, N] bool`.
      gt_boxes `[B, G, 4]`, gt_labels `[B, G] int32`, gt_valid `[B, G] bool`.
    Returns: {'loss_cls', 'loss_pts_init', 'loss_pts_refine'} float32 scalars (float64 in a
      float64 run); with `return_targets` also `targets` (`reppoints_targets`, batched).
    """
    dt = dtypes.float_dtype(cls_scores, pts_init, pts_refine, gt_boxes)
    points = jnp.asarray(points, dt)
    strides = jnp.asarray(strides, dt)
    moment = jnp.asarray(moment, dt)
    pts_init = pts_init.astype(dt)
    pts_refine = pts_refine.astype(dt)
    proposals = init_boxes(
        jax.lax.stop_gradient(pts_init), jax.lax.stop_gradient(moment), points, strides
    )

    def one(props, valid, boxes, labels, gvalid):
        return reppoints_targets(
            points,
            strides,
            props,
            valid,
            boxes,
            labels,
            gvalid,
            num_classes=num_classes,
            init_scale=init_scale,
            init_pos_num=init_pos_num,
            refine_pos_iou_thr=refine_pos_iou_thr,
            refine_neg_iou_thr=refine_neg_iou_thr,
            refine_min_pos_iou=refine_min_pos_iou,
        )

    t = jax.vmap(one)(
        proposals,
        jnp.asarray(point_valid, bool),
        jnp.asarray(gt_boxes, dt),
        jnp.asarray(gt_labels, jnp.int32),
        jnp.asarray(gt_valid, bool),
    )
    onehot = jax.nn.one_hot(t["labels"], num_classes, dtype=dt)  # background row all 0
    focal = loss_ops.sigmoid_focal_loss(
        cls_scores.astype(dt), onehot, gamma=focal_gamma, alpha=focal_alpha
    )
    cls_per_img = jnp.sum(focal.sum(-1) * t["label_weights"], axis=1)

    norm = (point_base_scale * strides)[None, :, None]  # [1, N, 1]
    box_i = points_to_boxes(pts_to_coords(pts_init, points, strides), moment, y_first=False)
    box_r = points_to_boxes(pts_to_coords(pts_refine, points, strides), moment, y_first=False)
    l1_i = loss_ops.smooth_l1_loss(box_i / norm, t["gt_init"] / norm, beta=smooth_l1_beta)
    l1_r = loss_ops.smooth_l1_loss(box_r / norm, t["gt_refine"] / norm, beta=smooth_l1_beta)
    init_per_img = jnp.sum(jnp.where(t["pos_init"][..., None], l1_i, 0.0), axis=(1, 2))
    ref_per_img = jnp.sum(jnp.where(t["pos_refine"][..., None], l1_r, 0.0), axis=(1, 2))
    n_init = jnp.maximum(jnp.sum(t["pos_init"], axis=1), 1).astype(dt)
    n_ref = jnp.maximum(jnp.sum(t["pos_refine"], axis=1), 1).astype(dt)
    who = "reppoints_loss"
    out = dict(
        loss_cls=loss_cls_weight * group_mean(cls_per_img, n_ref, loss_norm_group, who),
        loss_pts_init=loss_init_weight * group_mean(init_per_img, n_init, loss_norm_group, who),
        loss_pts_refine=loss_refine_weight * group_mean(ref_per_img, n_ref, loss_norm_group, who),
    )
    if return_targets:
        out["targets"] = t
    return out


# ------------------------------------------------------------------------------- inference
def reppoints_postprocess(
    cls_scores: Sequence[Array],
    pts_refine: Sequence[Array],
    moment: Array,
    strides: Sequence[int],
    img_shape: Array,
    scale_factor: Array,
    num_classes: int,
    nms_pre: int = _TEST.nms_pre,
    score_thr: float = _TEST.score_thr,
    iou_threshold: float = _TEST.iou_threshold,
    max_per_img: int = _TEST.max_per_img,
    max_candidates: int = _TEST.max_candidates,
) -> dict[str, Array]:
    """mmdetection 2.11 `RepPointsHead.get_bboxes` (rescale=True) + `multiclass_nms`, static.

    Args: cls_scores / pts_refine per level `[B, H, W, C]` logits / `[B, H, W, 2P]`; moment
      `[2]`; strides per level; img_shape `[B, 2]` (h, w) of the resized image; scale_factor
      `[B, 4]` (w, h, w, h).
    Returns: dict(boxes `[B, K, 4]` xyxy in original-image pixels, scores `[B, K]`,
      labels `[B, K] int32`, valid `[B, K] bool`), K = max_per_img, sorted by score.
    """
    img_shape = jnp.asarray(img_shape)
    dt = dtypes.float_dtype(*cls_scores, *pts_refine)
    scale_factor = jnp.asarray(scale_factor, dt)
    moment = jnp.asarray(moment, dt)
    batch = cls_scores[0].shape[0]
    hw = img_shape[:, ::-1].astype(dt)  # (w, h)
    upper = jnp.concatenate([hw, hw], axis=-1)[:, None, :]  # [B, 1, 4]
    all_boxes, all_scores = [], []
    for cls, pts, stride in zip(cls_scores, pts_refine, strides, strict=True):
        h, w = cls.shape[1:3]
        scores = jax.nn.sigmoid(cls.reshape(batch, -1, num_classes).astype(dt))
        points, _ = reppoints_points([(h, w)], [stride])
        box = points_to_boxes(pts.reshape(batch, h * w, -1).astype(dt), moment) * stride
        box = box + jnp.concatenate([points, points], axis=-1).astype(dt)[None]
        if 0 < nms_pre < scores.shape[1]:
            scores, box = top_candidates(scores.max(-1), nms_pre, scores, box)
        all_boxes.append(jnp.clip(box, 0.0, upper))
        all_scores.append(scores)
    boxes = jnp.concatenate(all_boxes, axis=1) / scale_factor[:, None, :]
    scores = jnp.concatenate(all_scores, axis=1)
    return batched_multiclass_nms(
        boxes,
        scores,
        score_thr=score_thr,
        iou_threshold=iou_threshold,
        max_num=max_per_img,
        max_candidates=max_candidates,
    )


# -------------------------------------------------------------------------------- detector
class RepPoints(SingleStageDetector):
    """mmdetection 2.x `RepPointsDetector` implementing the detector API of
    docs/contracts.md.

    Build with `RepPoints.from_config(fgd_jax.config.reppoints_model(...))` or by hand. Groups:
    `backbone`, `neck`, `head` (-> `bbox_head`, a `RepPointsHead`, with `num_classes`),
    `train_cfg` (`RepPointsTrainCfg`), `test_cfg` (`dense_heads.DenseTestCfg`).
    """

    backbone: nn.Module
    neck: nn.Module
    bbox_head: RepPointsHead
    train_cfg: RepPointsTrainCfg = RepPointsTrainCfg()
    test_cfg: DenseTestCfg = DenseTestCfg()

    KIND = "reppoints"
    HEAD = RepPointsHead
    TRAIN_CFG = RepPointsTrainCfg
    TEST_CFG = DenseTestCfg
    STRIDES_FIELD = "point_strides"

    def _neck(self, images: Array, train: bool) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        return self.neck(self.backbone(images, train=train), with_pre_norm=True)

    def extract_feat(self, images: Array, train: bool = False) -> tuple[Array, ...]:
        """`[B, H, W, 3]` -> the distilled FPN maps P3..P7 (the `fpn_convs_{l}/conv` outputs,
        before a GN neck's norm), NHWC, finest first."""
        return self._neck(images, train)[1]

    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """`[B, H, W, 3]` -> dict(features (as `extract_feat`), cls_scores, pts_init,
        pts_refine, moment_transfer), see `RepPointsHead`."""
        outs, distilled = self._neck(images, train)
        cls_scores, pts_init, pts_refine, moment = self.bbox_head(outs)
        return dict(
            features=distilled,
            cls_scores=cls_scores,
            pts_init=pts_init,
            pts_refine=pts_refine,
            moment_transfer=moment,
        )

    def loss(self, outs: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        """Losses from head outputs `outs` (as `__call__` returns) and a batch dict."""
        self.check_batch(batch)
        head, tc = self.bbox_head, self.train_cfg
        shapes = [tuple(c.shape[1:3]) for c in outs["cls_scores"]]
        points, strides = reppoints_points(shapes, head.point_strides)
        valid = point_valid_flags(shapes, head.point_strides, batch["img_shape"], tc.size_divisor)
        pts_dim = 2 * head.num_points
        return reppoints_loss(
            flatten_levels(outs["cls_scores"], head.num_classes),
            flatten_levels(outs["pts_init"], pts_dim),
            flatten_levels(outs["pts_refine"], pts_dim),
            outs["moment_transfer"],
            points,
            strides,
            valid,
            jnp.asarray(batch["boxes"], dtypes.float_dtype(batch["boxes"])),
            batch["labels"],
            batch["valid"],
            num_classes=head.num_classes,
            point_base_scale=head.point_base_scale,
            focal_gamma=head.focal_gamma,
            focal_alpha=head.focal_alpha,
            loss_cls_weight=head.loss_cls_weight,
            smooth_l1_beta=head.smooth_l1_beta,
            loss_init_weight=head.loss_init_weight,
            loss_refine_weight=head.loss_refine_weight,
            init_scale=tc.init_scale,
            init_pos_num=tc.init_pos_num,
            refine_pos_iou_thr=tc.refine_pos_iou_thr,
            refine_neg_iou_thr=tc.refine_neg_iou_thr,
            refine_min_pos_iou=tc.refine_min_pos_iou,
            loss_norm_group=tc.loss_norm_group,
        )

    def postprocess(
        self, outs: dict[str, Any], img_shape: Array, scale_factor: Array
    ) -> dict[str, Array]:
        """`reppoints_postprocess` with this model's settings on `__call__` outputs."""
        head, tc = self.bbox_head, self.test_cfg
        return reppoints_postprocess(
            outs["cls_scores"],
            outs["pts_refine"],
            outs["moment_transfer"],
            head.point_strides,
            img_shape,
            scale_factor,
            num_classes=head.num_classes,
            nms_pre=tc.nms_pre,
            score_thr=tc.score_thr,
            iou_threshold=tc.iou_threshold,
            max_per_img=tc.max_per_img,
            max_candidates=tc.max_candidates,
        )

"""The FGD loss (Focal and Global Knowledge Distillation for Detectors, CVPR 2022).

A JAX port of the original `FeatureLoss` (yzd-v/FGD, `mmdet/distillation/losses/fgd.py`) for one
FPN level, with NHWC features instead of NCHW. For a student map S and a teacher map T (the
student first goes through `align`, a 1x1 conv, when the channel counts differ):

- focal part: `fg = sum((S - T)^2 * A_s(T) * A_c(T) * M_fg) / B` and the same with `M_bg`, where
  `A_s`, `A_c` are the teacher's spatial and channel attention (`spatial_channel_attention`)
  and `M_fg`, `M_bg` the box masks (`fg_bg_masks`);
- attention part: `mask = sum|A_c(S) - A_c(T)| / B + sum|A_s(S) - A_s(T)| / B`;
- global part: `relation = sum((GC_s(S) - GC_t(T))^2) / B`, `GC` a GcBlock (attention pooling
  by a 1x1 conv + softmax over H*W, then 1x1 conv -> LayerNorm -> ReLU -> 1x1 conv, added to
  every position);
- `loss = alpha_fgd * fg + beta_fgd * bg + gamma_fgd * mask + lambda_fgd * relation`.

`box_scale` chooses how boxes are mapped onto the feature grid:
- 'img_shape' (the original, default): `x / img_w * W`, `y / img_h * H` with (img_h, img_w) the
  resized image before padding. The feature map covers the padded canvas, so on images that
  are padded the boxes are stretched towards the bottom/right (by pad_w / img_w). This is what
  the paper's numbers were trained with.
- 'pad_shape' (geometrically correct): divide by the canvas size (pad_h, pad_w) instead, so a
  box lands on the cells that actually see it (up to the network's stride rounding).

The original's `yolox` branch (YOLOX-l -> YOLOX-m) passes the batch resize factors of YOLOX's
multi-scale training, `FeatureLoss(S, T, gt, scale_y, scale_x, img_metas)`: the boxes (in the
resized batch's pixels, while `img_shape` is the pipeline's) are mapped with
`x / img_w * W / scale_x`, `y / img_h * H / scale_y`, and the loss is divided by `scale_x`
then `scale_y`. `FGDLoss(..., input_scale=(scale_y, scale_x))` is that variant; without
`input_scale` the computation is the master branch's, unchanged.

Implementation: the work over the [B, H, W, C] maps is three fused passes with hand-written
VJPs (`_abs_and_logit_stats`, `_pool_and_focal`, `_relation_sum`: see the comment above them);
the loss equals the straightforward formulas (tests/test_fgd.py, against the original, float64
and float32) and runs ~2x faster than autodiff of those formulas on XLA:CPU.

Teacher features are treated as constants (`stop_gradient`), as in the original, where they
come out of `torch.no_grad()`; the teacher-side parameters (`conv_mask_t`,
`channel_add_conv_t_*`) still get gradients from the relation loss, as in the original.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BOX_SCALES = ("img_shape", "pad_shape")


# ------------------------------------------------------------------------------ initializers
def _torch_conv_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default conv weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_conv_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default conv bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape, dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# mmcv kaiming_init(mode='fan_in') with its defaults a=0, nonlinearity='relu',
# distribution='normal' (untruncated), bias=0: N(0, 2 / fan_in).
_mmcv_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


# --------------------------------------------------------------------------- pure functions
def _attention_from_means(
    abs_mean_c: Array, abs_mean_hw: Array, temp: float
) -> tuple[Array, Array]:
    """[B, N] mean_c |F| and [B, C] mean_hw |F| -> spatial [B, N] = N * softmax(./temp),
    channel [B, C] = C * softmax(./temp)."""
    spatial = abs_mean_c.shape[-1] * jax.nn.softmax(abs_mean_c / temp, axis=-1)
    channel = abs_mean_hw.shape[-1] * jax.nn.softmax(abs_mean_hw / temp, axis=-1)
    return spatial, channel


def spatial_channel_attention(feat: Array, temp: float) -> tuple[Array, Array]:
    """Spatial and channel attention of a feature map, as the original `get_attention`.

    Args:
      feat: [B, H, W, C] float features.
      temp: softmax temperature.
    Returns:
      spatial: [B, H, W] = H * W * softmax_{h,w}(mean_c |feat| / temp) (mean 1 per image).
      channel: [B, C] = C * softmax_c(mean_{h,w} |feat| / temp) (mean 1 per image).
    """
    b, h, w, c = feat.shape
    amc, amh, _ = _abs_and_logit_stats(feat, jnp.zeros((c,), feat.dtype))
    spatial, channel = _attention_from_means(amc.reshape(b, h * w), amh, temp)
    return spatial.reshape(b, h, w), channel


def fg_bg_masks(
    boxes: Array,
    valid: Array,
    img_shape: Array,
    pad_shape: Array,
    feat_hw: tuple[int, int],
    box_scale: str = "img_shape",
    dtype: jnp.dtype = jnp.float32,
    unroll: int | bool | None = None,
    input_scale: Array | None = None,
) -> tuple[Array, Array]:
    """Foreground / background masks of the original FGD, vectorized over images, boxes, cells.

    A box scaled to the grid (see the module docstring for `box_scale`) covers the cells
    `floor(y1') <= h <= ceil(y2')`, `floor(x1') <= w <= ceil(x2')` (both ends inclusive, as the
    original's `[hmin:hmax+1]` slices) and gives them `1 / (hmax + 1 - hmin) / (wmax + 1 - wmin)`
    (with the unclipped indices, so a box reaching the last row/column counts one row/column
    beyond the grid, as in the original); `fg` is the max over the covering boxes, 0 elsewhere.
    `bg = (fg == 0) / sum(fg == 0)` per image (all zeros if every cell is foreground). Padded
    boxes (`valid=False`) and boxes with non-finite scaled coordinates (a zero frame size) mark
    nothing; an image without boxes has `fg = 0`, `bg = 1 / (H*W)`.

    Outside coordinates: the scaled coordinates are clipped to [0, W] x [0, H] first (which is
    the same as clipping the boxes to the scaling frame: the image for 'img_shape', the canvas
    for 'pad_shape'). For boxes inside that frame (all real data) this changes nothing and the
    masks equal the original's bit for bit. The original does not clip: a box with x1' < 0 has
    `wmin < 0`, and PyTorch reads the slice `[wmin:wmax+1]` from the END of the row (usually
    empty, sometimes the last cells), and its area counts the cells outside; we mark the
    clipped box instead. A cell is marked exactly when the original's slices are non-empty
    (so a clearly inverted box, ceil(x2') < floor(x1'), marks nothing). The cell values are
    computed in float32 like the original's (`1.0 / int / int`), then cast to `dtype`.

    Args:
      boxes: [B, G, 4] xyxy, pixels of the resized image (contracts.md).
      valid: [B, G] bool, True for real boxes.
      img_shape: [B, 2] (h, w) of the resized image before padding.
      pad_shape: [B, 2] (h, w) of the padded canvas the feature map covers.
      feat_hw: (H, W) of the feature map (static).
      box_scale: 'img_shape' (original) or 'pad_shape'.
      dtype: dtype of the returned masks.
      unroll: of the loop over boxes (same result either way). Default: on CPU a loop over
        the slots up to the batch's last marking box only (a dynamic trip count), elsewhere
        all G slots fully unrolled (one fused kernel on GPU instead of G small ones; not
        timed yet). An int or True: all G slots with that unroll.
      input_scale: [B, 2] float (scale_y, scale_x), the original `yolox` branch's batch
        resize factors (YOLOX's multi-scale input size / default input size): the scaled
        coordinates are further divided by them, `x / img_w * W / scale_x`, as its
        `FeatureLoss`. None (default): no such division (the master branch, unchanged).
        With it the scaled coordinates are clipped to [0, W + 1] x [0, H + 1] instead of
        [0, W] x [0, H]: rounding (of `x * scale_x / img_w * W / scale_x`) can put a box on
        the frame's right or bottom edge a hair beyond W, where the original's ceil gives
        W + 1; that box's cells and area then equal the original's bit for bit.
    Returns:
      fg: [B, H, W] dtype; bg: [B, H, W] dtype. Both constant w.r.t. gradients.
    """
    if box_scale not in BOX_SCALES:
        raise ValueError(f"fg_bg_masks: box_scale must be one of {BOX_SCALES}, got {box_scale!r}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"fg_bg_masks: boxes must be [B, G, 4], got shape {boxes.shape}")
    if valid.shape != boxes.shape[:2]:
        raise ValueError(
            f"fg_bg_masks: valid must be [B, G] = {boxes.shape[:2]}, got shape {valid.shape}"
        )
    for key, arr in (("img_shape", img_shape), ("pad_shape", pad_shape)):
        if arr.shape != (boxes.shape[0], 2):
            raise ValueError(
                f"fg_bg_masks: {key} must be [B, 2] = {(boxes.shape[0], 2)}, got {arr.shape}"
            )
    h, w = int(feat_hw[0]), int(feat_hw[1])
    frame = img_shape if box_scale == "img_shape" else pad_shape
    # constants w.r.t. gradients from the start (no tangent reaches the dynamic loop below,
    # which reverse-mode autodiff could not handle)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes))
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        boxes = boxes.astype(jnp.float32)
    frame = jax.lax.stop_gradient(jnp.asarray(frame).astype(boxes.dtype))
    # Same operation order as the original (divide by the frame, then multiply by the grid
    # size) so that floor/ceil see the same floats. XLA rewrites `x / broadcast(y)` as
    # `x * broadcast(1 / y)` (rounding differently: a box edge on a cell border can move by a
    # cell); dividing by full-shape operands behind an optimization barrier keeps the true
    # division.
    full = boxes.shape[:2]
    frame_h, frame_w = jax.lax.optimization_barrier(
        (jnp.broadcast_to(frame[:, 0:1], full), jnp.broadcast_to(frame[:, 1:2], full))
    )  # [B, G]
    x1, x2 = boxes[..., 0] / frame_w * w, boxes[..., 2] / frame_w * w
    y1, y2 = boxes[..., 1] / frame_h * h, boxes[..., 3] / frame_h * h
    if input_scale is not None:  # the yolox branch: `... * W / scale_x`, a true division
        scale = jax.lax.stop_gradient(jnp.asarray(input_scale).astype(boxes.dtype))
        if scale.shape != (boxes.shape[0], 2):
            raise ValueError(
                f"fg_bg_masks: input_scale must be [B, 2] = {(boxes.shape[0], 2)}, "
                f"got {scale.shape}"
            )
        scale_h, scale_w = jax.lax.optimization_barrier(
            (jnp.broadcast_to(scale[:, 0:1], full), jnp.broadcast_to(scale[:, 1:2], full))
        )
        x1, x2, y1, y2 = x1 / scale_w, x2 / scale_w, y1 / scale_h, y2 / scale_h
        # rounding can put a box on the frame's right/bottom edge a hair beyond W (H); the
        # original's ceil then reaches W + 1 and its area counts that column: keep it
        hi_w, hi_h = w + 1, h + 1
    else:
        hi_w, hi_h = w, h
    x1, x2 = jnp.clip(x1, 0, hi_w), jnp.clip(x2, 0, hi_w)
    y1, y2 = jnp.clip(y1, 0, hi_h), jnp.clip(y2, 0, hi_h)
    wmin = jnp.floor(x1).astype(jnp.int32)  # [B, G]
    wmax = jnp.ceil(x2).astype(jnp.int32)
    hmin = jnp.floor(y1).astype(jnp.int32)
    hmax = jnp.ceil(y2).astype(jnp.int32)

    rows_n = hmax + 1 - hmin
    cols_n = wmax + 1 - wmin
    finite = jnp.all(jnp.isfinite(jnp.stack([x1, x2, y1, y2], -1)), -1)  # e.g. a 0 frame
    nonempty = (rows_n > 0) & (cols_n > 0) & jnp.asarray(valid, bool) & finite
    safe_rows = jnp.where(nonempty, rows_n, 1).astype(jnp.float32)
    safe_cols = jnp.where(nonempty, cols_n, 1).astype(jnp.float32)
    # The original's float32 `1.0 / rows / cols` (two roundings). The barrier keeps XLA from
    # rewriting it as `1.0 / (rows * cols)`, which rounds differently for some (rows, cols).
    inv_rows = jax.lax.optimization_barrier(1.0 / safe_rows)
    area = jnp.where(nonempty, inv_rows / safe_cols, 0.0).astype(dtype)  # [B, G]

    # Separable cover: per box a row profile (its value on the rows it covers, 0 elsewhere) and
    # a column indicator; fg = max over boxes of their outer "product". A loop over the G boxes
    # of [B, H, W] maxima: on XLA:CPU a reduction over a [B, G, H, W] tensor's G axis is ~100x
    # slower than this loop (0.4 ms for B=2, G=100, 100x168).
    hh = jnp.arange(h, dtype=jnp.int32)
    ww = jnp.arange(w, dtype=jnp.int32)
    in_rows = (hh >= hmin[..., None]) & (hh <= hmax[..., None]) & nonempty[..., None]  # [B,G,H]
    in_cols = (ww >= wmin[..., None]) & (ww <= wmax[..., None])  # [B, G, W]
    zero = jnp.zeros((), dtype)
    row_val = jnp.where(in_rows, area[..., None], zero)  # [B, G, H]

    def paint(g: Array, fg: Array) -> Array:
        cell = jnp.where(in_cols[:, g, None, :], row_val[:, g, :, None], zero)  # [B, H, W]
        return jnp.maximum(fg, cell)

    fg0 = jnp.zeros((boxes.shape[0], h, w), dtype)
    if unroll is None and jax.default_backend() == "cpu":
        # only the slots up to the last valid box of the batch (padding is usually most of
        # the G slots: 10x less work for 10 boxes in 100 slots); a dynamic trip count
        last = jnp.max(jnp.where(nonempty, jnp.arange(boxes.shape[1]) + 1, 0))
        fg = jax.lax.fori_loop(0, last, paint, fg0)
    else:
        unroll = True if unroll is None else unroll
        fg = jax.lax.fori_loop(0, boxes.shape[1], paint, fg0, unroll=unroll)

    is_bg = (fg == 0).astype(dtype)
    bg_sum = jnp.sum(is_bg, axis=(1, 2), keepdims=True)
    divisor = jax.lax.optimization_barrier(
        jnp.broadcast_to(jnp.where(bg_sum > 0, bg_sum, 1), is_bg.shape)
    )  # full shape: a true division, as above
    bg = is_bg / divisor
    return jax.lax.stop_gradient(fg), jax.lax.stop_gradient(bg)


# ------------------------------------------------------------------ fused passes (custom VJPs)
# The loss reads feature maps [B, H, W, C] many times. On XLA:CPU a pass over the 5 levels of a
# batch costs ~2 ms, every materialized [B, H, W, C] intermediate ~12 ms (a write to fresh
# memory), and arrays [B, H, W] or [B, C] are cheap. So the big-tensor work is three functions
# that return only small reductions, with hand-written VJPs: the feature cotangent of each is
# an elementwise expression (XLA sums the three into the single gradient write) and their
# weight cotangents are matrix-vector products. Softmaxes, the GcBlock MLP and the attention
# losses in between are small and left to autodiff.
#
# XLA:CPU pitfalls these functions avoid (jax 0.10, measured on the 5-level benchmark):
# - two reductions of one tensor over different axes (or two sums of the same difference)
#   merged into one multi-output loop run 5-10x slower than apart; an `optimization_barrier`
#   on the operand makes them separate computations;
# - a barrier on a *reshaped* parameter makes XLA copy it, so barriers take the 4-D maps;
# - `s - t` used by two reductions is materialized; each reduction recomputes it instead.


def _barrier(*xs: Array) -> tuple[Array, ...]:
    return jax.lax.optimization_barrier(xs)


@jax.custom_vjp
def _abs_and_logit_stats(x: Array, k: Array) -> tuple[Array, Array, Array]:
    """x [B, H, W, C], k [C] -> mean_c |x| [B, H, W], mean_hw |x| [B, C], x @ k [B, H, W]."""
    return _abs_and_logit_stats_fwd(x, k)[0]


def _abs_and_logit_stats_fwd(x, k):
    amc = jnp.mean(jnp.abs(x), axis=-1)
    (xa,) = _barrier(x)
    amh = jnp.mean(jnp.abs(xa), axis=(1, 2))
    return (amc, amh, jnp.dot(x, k)), (x, k)


def _abs_and_logit_stats_bwd(res, g):
    x, k = res
    g_amc, g_amh, g_logit = g
    hw, c = x.shape[1] * x.shape[2], x.shape[3]
    g_abs = g_amc[..., None] / c + g_amh[:, None, None, :] / hw
    g_x = jnp.sign(x) * g_abs + g_logit[..., None] * k
    g_k = jnp.einsum("bhw,bhwc->c", g_logit, x)
    return g_x, g_k


_abs_and_logit_stats.defvjp(_abs_and_logit_stats_fwd, _abs_and_logit_stats_bwd)


@jax.custom_vjp
def _pool_and_focal(
    s: Array, t: Array, w_s: Array, w_t: Array, ch_t: Array
) -> tuple[Array, Array, Array, Array]:
    """s, t [B, H, W, C], pooling weights w_s, w_t [B, H, W], channel weights ch_t [B, C] ->
    context_s = sum_hw w_s s [B, C], context_t = sum_hw w_t t [B, C],
    per_cell = sum_c (s - t)^2 ch_t [B, H, W], colsum = sum_hw (s - t) [B, C]."""
    return _pool_and_focal_fwd(s, t, w_s, w_t, ch_t)[0]


def _pool_and_focal_fwd(s, t, w_s, w_t, ch_t):
    def pool_and_sum(x, w):  # one matmul: [w, 1] . x -> [B, 2, C]
        return jnp.einsum("bkhw,bhwc->bkc", jnp.stack([w, jnp.ones_like(w)], 1), x)

    ps, pt = pool_and_sum(s, w_s), pool_and_sum(t, w_t)
    s2, t2 = _barrier(s, t)
    # ((s - t) sqrt(ch))^2 as the original writes it; XLA:CPU runs sum((s - t)^2 ch) ~5x slower
    scaled = (s2 - t2) * jnp.sqrt(ch_t)[:, None, None, :]
    per_cell = jnp.sum(scaled * scaled, axis=-1)
    return (ps[:, 0], pt[:, 0], per_cell, ps[:, 1] - pt[:, 1]), (s, t, w_s, w_t, ch_t)


def _pool_and_focal_bwd(res, g):
    s, t, w_s, w_t, ch_t = res
    g_cs, g_ct, g_pc, g_col = g
    diff = s - t
    g_diff = 2.0 * diff * (ch_t[:, None, None, :] * g_pc[..., None]) + g_col[:, None, None, :]
    g_s = w_s[..., None] * g_cs[:, None, None, :] + g_diff
    g_t = w_t[..., None] * g_ct[:, None, None, :] - g_diff
    g_w_s = jnp.einsum("bhwc,bc->bhw", s, g_cs)
    g_w_t = jnp.einsum("bhwc,bc->bhw", t, g_ct)
    g_ch_t = jnp.einsum("bhw,bhwc->bc", g_pc, diff * diff)
    # (the loss treats t, hence ch_t, as constants: XLA drops g_t and g_ch_t unused)
    return g_s, g_t, g_w_s, g_w_t, g_ch_t


_pool_and_focal.defvjp(_pool_and_focal_fwd, _pool_and_focal_bwd)


@jax.custom_vjp
def _relation_sum(s: Array, t: Array, d: Array, colsum: Array) -> Array:
    """sum over [B, H, W, C] of (s - t + d)^2 with d [B, C]. `colsum` = sum_hw (s - t) [B, C]
    (from `_pool_and_focal`) does not change the value; it spares the backward a pass."""
    return _relation_sum_fwd(s, t, d, colsum)[0]


def _relation_sum_fwd(s, t, d, colsum):
    # the barrier orders this pass after `d` is known, apart from the other reductions
    s2, t2, d2 = _barrier(s, t, d)
    r = s2 - t2 + d2[:, None, None, :]
    return jnp.sum(r * r), (s, t, d, colsum)


def _relation_sum_bwd(res, g):
    s, t, d, colsum = res
    hw = s.shape[1] * s.shape[2]
    g_s = (2.0 * g) * (s - t + d[:, None, None, :])
    g_d = (2.0 * g) * (colsum + hw * d)
    return g_s, -g_s, g_d, jnp.zeros_like(colsum)


_relation_sum.defvjp(_relation_sum_fwd, _relation_sum_bwd)


# ----------------------------------------------------------------------------------- module
class Conv1x1(nn.Module):
    """A 1x1 convolution with bias as a matmul over the channel axis (XLA:CPU runs a 1x1
    `conv_general_dilated` an order of magnitude slower than the same dot). Parameters as
    `nn.Conv`: `kernel` [1, 1, I, O] (HWIO), `bias` [O]; input [..., I] -> [..., O]."""

    features: int
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array | None = None, *, in_features: int | None = None):
        """x [..., I] -> [..., O]; or, with `x=None` and `in_features=I`, the weights
        (kernel [I, O], bias [O]) for a caller that applies them itself."""
        in_features = x.shape[-1] if x is not None else in_features
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, in_features, self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        if x is None:
            return kernel[0, 0], bias
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        return jnp.dot(x.astype(dtype), kernel[0, 0].astype(dtype)) + bias.astype(dtype)


class FGDLoss(nn.Module):
    """The FGD loss of one feature level; parameters named as the original `FeatureLoss`.

    Parameters (Flax names = mmdetection names with Sequential indices joined by `_`):
    `align` (1x1 Cs -> Ct, only when Cs != Ct), `conv_mask_s` / `conv_mask_t` (1x1 Ct -> 1),
    `channel_add_conv_{s,t}_0` (1x1 Ct -> Ct/2), `channel_add_conv_{s,t}_1` (LayerNorm over Ct/2,
    eps 1e-5), `channel_add_conv_{s,t}_3` (1x1 Ct/2 -> Ct, zero init). Init as the original:
    PyTorch's default conv init, mmcv kaiming fan_in normal for `conv_mask_*`, zeros for the
    last conv of each channel-add branch.

    Attributes:
      student_channels, teacher_channels: C of the student / teacher features.
      temp: attention temperature.
      alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd: weights of fg, bg, mask, relation.
      box_scale: 'img_shape' (original) | 'pad_shape' (see the module docstring).
    """

    student_channels: int
    teacher_channels: int
    temp: float = 0.5
    alpha_fgd: float = 0.001
    beta_fgd: float = 0.0005
    gamma_fgd: float = 0.001
    lambda_fgd: float = 0.000005
    box_scale: str = "img_shape"
    param_dtype: jnp.dtype = jnp.float32

    def _conv(self, name: str, fan_in: int, features: int, init: str = "torch") -> Conv1x1:
        if init == "torch":
            k_init, b_init = _torch_conv_kernel_init(), _torch_conv_bias_init(fan_in)
        elif init == "kaiming":
            k_init, b_init = _mmcv_kaiming_fan_in, nn.initializers.zeros
        else:  # "zeros"
            k_init, b_init = nn.initializers.zeros, nn.initializers.zeros
        return Conv1x1(
            features,
            kernel_init=k_init,
            bias_init=b_init,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _channel_add(self, context: Array, side: str) -> Array:
        """channel_add_conv_{side}: [B, C] -> [B, C] (on a [B, 1, 1, C] map as the original)."""
        c = context.shape[-1]
        y = context[:, None, None, :]
        y = self._conv(f"channel_add_conv_{side}_0", c, c // 2)(y)
        y = nn.LayerNorm(
            epsilon=1e-5,
            use_fast_variance=False,
            param_dtype=self.param_dtype,
            name=f"channel_add_conv_{side}_1",
        )(y)
        y = nn.relu(y)
        y = self._conv(f"channel_add_conv_{side}_3", c // 2, c, init="zeros")(y)
        return y[:, 0, 0, :]

    @nn.compact
    def __call__(
        self,
        preds_s: Array,
        preds_t: Array,
        boxes: Array,
        valid: Array,
        img_shape: Array,
        pad_shape: Array,
        batch_size: int | Array | None = None,
        input_scale: Array | None = None,
    ) -> dict[str, Array]:
        """FGD loss of one level.

        Args:
          preds_s: [B, H, W, Cs] student features.
          preds_t: [B, H, W, Ct] teacher features (treated as constants).
          boxes: [B, G, 4] float xyxy GT boxes, pixels of the resized image.
          valid: [B, G] bool, True for real boxes.
          img_shape: [B, 2] int (h, w) of the resized image before padding.
          pad_shape: [B, 2] int (h, w) of the padded canvas.
          batch_size: the divisor of every part. Default B, the leading dim of the arrays: under
            jit with sharded (global) arrays this already is the GLOBAL batch, which is what
            the original's per-GPU mean averaged over GPUs amounts to. Pass the global batch
            only when calling this on a per-device shard (e.g. inside shard_map / pmap); a
            Python int or a scalar array (traced values are fine).
          input_scale: the original's `yolox` branch variant (`FeatureLoss(S, T, gt, scale_y,
            scale_x, img_metas)`): [2] float (scale_y, scale_x), the batch resize factors of
            YOLOX's multi-scale training (input size / default input size, one pair for the
            whole batch). Boxes (pixels of the resized image) are mapped with
            `x / img_w * W / scale_x` (`y` alike) and the weighted loss, and each weighted
            part, is divided by `scale_x` then by `scale_y`. None (default): the master
            branch's loss, unchanged; (1, 1) gives the same values.
        Returns:
          dict of scalars (float32, or float64 for float64 inputs): `loss` (weighted total),
          the unweighted `fg`, `bg`, `mask`, `relation`, and the weighted `loss_fg`,
          `loss_bg`, `loss_mask`, `loss_relation` (divided by the scales with `input_scale`).
        """
        if self.box_scale not in BOX_SCALES:
            raise ValueError(
                f"FGDLoss: box_scale must be one of {BOX_SCALES}, got {self.box_scale!r}"
            )
        if preds_s.ndim != 4 or preds_t.ndim != 4:
            raise ValueError(
                f"FGDLoss: features must be NHWC [B, H, W, C], got student {preds_s.shape} "
                f"and teacher {preds_t.shape}"
            )
        if preds_s.shape[:3] != preds_t.shape[:3]:
            raise ValueError(
                f"FGDLoss: student and teacher features differ in [B, H, W]: {preds_s.shape} "
                f"vs {preds_t.shape}"
            )
        if preds_s.shape[-1] != self.student_channels:
            raise ValueError(
                f"FGDLoss: student features have {preds_s.shape[-1]} channels, "
                f"student_channels={self.student_channels}"
            )
        if preds_t.shape[-1] != self.teacher_channels:
            raise ValueError(
                f"FGDLoss: teacher features have {preds_t.shape[-1]} channels, "
                f"teacher_channels={self.teacher_channels}"
            )
        if boxes.shape[0] != preds_s.shape[0]:
            raise ValueError(
                f"FGDLoss: boxes {boxes.shape} and features {preds_s.shape} differ in batch size"
            )

        b, h, w, _ = preds_s.shape
        dtype = jnp.promote_types(preds_s.dtype, jnp.float32)
        n = b if batch_size is None else batch_size
        s = preds_s.astype(dtype)
        t = jax.lax.stop_gradient(preds_t.astype(dtype))
        if self.student_channels != self.teacher_channels:
            s = self._conv("align", self.student_channels, self.teacher_channels)(s)

        c = self.teacher_channels
        k_s, bias_s = self._conv("conv_mask_s", c, 1, init="kaiming")(in_features=c)
        k_t, bias_t = self._conv("conv_mask_t", c, 1, init="kaiming")(in_features=c)
        # one pass over each map: the |.| means of both attentions and the GcBlock logits
        amc_t, amh_t, logit_t = _abs_and_logit_stats(t, k_t[:, 0].astype(dtype))
        amc_s, amh_s, logit_s = _abs_and_logit_stats(s, k_s[:, 0].astype(dtype))
        spatial_t, channel_t = _attention_from_means(amc_t.reshape(b, h * w), amh_t, self.temp)
        spatial_s, channel_s = _attention_from_means(amc_s.reshape(b, h * w), amh_s, self.temp)
        # GcBlock attention pooling weights, softmax over H*W
        w_s = jax.nn.softmax((logit_s + bias_s.astype(dtype)).reshape(b, h * w), axis=-1)
        w_t = jax.nn.softmax((logit_t + bias_t.astype(dtype)).reshape(b, h * w), axis=-1)
        if input_scale is None:
            fg_mask, bg_mask = fg_bg_masks(
                boxes, valid, img_shape, pad_shape, (h, w), self.box_scale, dtype=dtype
            )
        else:
            input_scale = jnp.asarray(input_scale)
            if input_scale.shape != (2,):
                raise ValueError(
                    f"FGDLoss: input_scale must be [2] (scale_y, scale_x), got shape "
                    f"{input_scale.shape}"
                )
            fg_mask, bg_mask = fg_bg_masks(
                boxes,
                valid,
                img_shape,
                pad_shape,
                (h, w),
                self.box_scale,
                dtype=dtype,
                input_scale=jnp.broadcast_to(input_scale, (b, 2)),
            )

        # Focal part: the original multiplies both maps by sqrt(S_t) sqrt(C_t) sqrt(M) before
        # the squared difference; the same sum is (s - t)^2 * S_t * C_t * M, i.e.
        # per_cell = sum_c (s - t)^2 C_t weighted by S_t * M over the cells.
        context_s, context_t, per_cell, colsum = _pool_and_focal(
            s, t, w_s.reshape(b, h, w), w_t.reshape(b, h, w), channel_t
        )
        weighted = per_cell.reshape(b, h * w) * spatial_t
        fg = jnp.sum(weighted * fg_mask.reshape(b, h * w)) / n
        bg = jnp.sum(weighted * bg_mask.reshape(b, h * w)) / n

        mask = (
            jnp.sum(jnp.abs(channel_s - channel_t)) / n
            + jnp.sum(jnp.abs(spatial_s - spatial_t)) / n
        )

        # Global part: (s + add_s) - (t + add_t) = (s - t) + (add_s - add_t).
        add_s = self._channel_add(context_s, "s")
        add_t = self._channel_add(context_t, "t")
        relation = _relation_sum(s, t, add_s - add_t, colsum) / n

        out = {
            "fg": fg,
            "bg": bg,
            "mask": mask,
            "relation": relation,
            "loss_fg": self.alpha_fgd * fg,
            "loss_bg": self.beta_fgd * bg,
            "loss_mask": self.gamma_fgd * mask,
            "loss_relation": self.lambda_fgd * relation,
        }
        out["loss"] = out["loss_fg"] + out["loss_bg"] + out["loss_mask"] + out["loss_relation"]
        if input_scale is not None:  # the yolox branch's `loss / scale_x / scale_y`
            scale = jax.lax.stop_gradient(input_scale.astype(dtype))
            for key in ("loss", "loss_fg", "loss_bg", "loss_mask", "loss_relation"):
                out[key] = out[key] / scale[1] / scale[0]
        return out

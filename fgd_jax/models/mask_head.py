"""Mask R-CNN's mask branch (mmdetection 2.x `FCNMaskHead`), Flax Linen, and its loss.

- `FCNMaskHead`: `num_convs` conv3x3 + ReLU (`convs_{i}/conv`, with bias: mmcv `ConvModule`
  without norm), a 2x2 stride-2 transposed conv + ReLU (`upsample`), a 1x1 conv to
  `num_classes` channels (`conv_logits`): RoI features `[..., 14, 14, C]` -> mask logits
  `[..., 28, 28, num_classes]`. Init as mmdetection: every conv kaiming-normal fan_out
  (mmcv `ConvModule` / `FCNMaskHead.init_weights`), biases 0.
  The transposed conv's `kernel` is `[2, 2, C_out, C_in]`, so the converter's one conv rule
  (OIHW -> HWIO, `transpose(2, 3, 1, 0)`) maps mmdetection's `upsample.weight` `[C_in, C_out,
  2, 2]` (PyTorch `ConvTranspose2d`) onto it, and the export rule back (no flip: a stride-2 2x2
  transposed conv writes each input pixel's 2x2 block, `y[2i + a, 2j + b, o] = sum_c
  x[i, j, c] W[c, o, a, b] + bias[o]`).
- `mask_loss`: mmdetection `CrossEntropyLoss(use_mask=True)` (`mask_cross_entropy`): BCE with
  logits of each positive RoI's GT-class channel against its 28 x 28 target, mean over
  positives x 28 x 28 (0 without positives, as mmdetection's `mask_preds.sum() * 0`), per
  group of `loss_norm_group` images (mmdetection's per-GPU mean) when given a batch axis.
Checked against real mmdetection: tests/test_mask_head.py (golden file
tests/golden/masks/masks.npz).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from fgd_jax.models.dense_heads import group_mean
from fgd_jax.models.layers import ConvModule, kaiming_fan_out, torch_conv
from fgd_jax.ops import dtypes

Array = jax.Array


class Deconv2x2(nn.Module):
    """PyTorch `ConvTranspose2d(c_in, features, kernel_size=2, stride=2)` on NHWC input:
    `[..., H, W, C_in]` -> `[..., 2H, 2W, features]`; `kernel [2, 2, features, C_in]` (the
    PyTorch weight `[C_in, features, 2, 2]` transposed (2, 3, 1, 0), as a conv's)."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c_in = x.shape[-1]
        # mmdetection: kaiming_normal_(fan_out) of the ConvTranspose2d weight [C_in, C_out,
        # 2, 2], whose "fan_out" is PyTorch's dim 0 x receptive field = C_in * 4: the fan_out
        # (last axis) of this [2, 2, C_out, C_in] kernel
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        kernel = self.param("kernel", init, (2, 2, self.features, c_in), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("...hwc,aboc->...hawbo", x, kernel)
        *lead, h, a, w, b, o = y.shape
        return y.reshape(*lead, h * a, w * b, o) + bias


class FCNMaskHead(nn.Module):
    """mmdetection `FCNMaskHead` (class-specific masks); see the module docstring.

    Call: RoI features `[..., S, S, in_channels]` -> logits `[..., 2S, 2S, num_classes]` in
    `float_dtype` of the output.
    """

    num_classes: int
    num_convs: int = 4
    conv_out_channels: int = 256
    roi_feat_size: int = 14
    # Training only (Mask R-CNN's `forward_train`, not this module's call): RoI slot counts
    # per image the mask branch may run on instead of the full positive quota, the smallest
    # that holds the batch's largest positive count being chosen at run time by `nn.switch`
    # (`MaskRoIHead.mask_train_loss`, same results); each is one more compiled branch.
    # () = always the quota (default): on XLA:CPU the switched train step MEASURED SLOWER
    # (reverse-mode through lax.switch runs more than the chosen branch:
    # benchmarks/results/mask_rcnn_cpu.md); e.g. (16, 32, 64) to try.
    train_roi_buckets: Sequence[int] = ()
    dtype: Any = None

    @nn.compact
    def __call__(self, roi_feats: Array) -> Array:
        lead = roi_feats.shape[:-3]
        x = roi_feats.reshape(-1, *roi_feats.shape[-3:])
        for i in range(self.num_convs):
            x = ConvModule(
                self.conv_out_channels, 3, act=True, kernel_init=kaiming_fan_out,
                dtype=self.dtype, name=f"convs_{i}",
            )(x)  # fmt: skip
        x = nn.relu(Deconv2x2(self.conv_out_channels, dtype=self.dtype, name="upsample")(x))
        x = torch_conv(
            self.num_classes, 1, use_bias=True, dtype=self.dtype, kernel_init=kaiming_fan_out,
            name="conv_logits",
        )(x)  # fmt: skip
        x = x.reshape(*lead, *x.shape[-3:])
        return x.astype(dtypes.float_dtype(x))


def mask_loss(
    mask_logits: Array, targets: Array, labels: Array, valid: Array, loss_norm_group: int = 0
) -> Array:
    """mmdetection `loss_mask` (BCE with logits on the GT class's channel, mean).

    Args:
      mask_logits: `[P, S, S, num_classes]` the head's output for the sampled RoIs, or
        `[B, P, S, S, num_classes]` per image.
      targets: `[(B,) P, S, S]` 0. / 1. (`fgd_jax.ops.masks.mask_targets`).
      labels: `[(B,) P] int32` GT class of each RoI (any value where not `valid`).
      valid: `[(B,) P] bool` the positive RoIs (padding and negatives False).
      loss_norm_group: with a batch axis, groups of this many images are each normalised by
        their own positives and averaged (mmdetection's per-GPU mean with `samples_per_gpu`
        images; `fgd_jax.models.dense_heads.group_mean`); 0: the whole batch at once.
    Returns:
      scalar: sum over valid RoIs and bins / (number of valid RoIs * S * S); 0 if none.
    """
    dt = dtypes.float_dtype(mask_logits)
    num_classes = mask_logits.shape[-1]
    lab = jnp.clip(labels, 0, num_classes - 1)
    x = jnp.take_along_axis(mask_logits.astype(dt), lab[..., None, None, None], axis=-1)[..., 0]
    t = targets.astype(dt)
    bce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    w = valid.astype(dt)[..., None, None]
    per_roi = x.shape[-1] * x.shape[-2]
    if valid.ndim == 1:
        return jnp.sum(bce * w) / jnp.maximum(jnp.sum(valid.astype(dt)) * per_roi, 1.0)
    num = jnp.sum((bce * w).reshape(valid.shape[0], -1), axis=1)
    den = jnp.sum(valid.astype(dt), axis=1) * per_roi
    return group_mean(num, den, loss_norm_group, "loss_mask")

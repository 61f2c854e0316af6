"""mmcv's deformable conv layers with their own offset branch, Flax Linen, NHWC.

- `DeformConv2dPack` (mmcv `DeformConv2dPack`, DCN v1): `conv_offset`, a plain conv with bias
  and the deformable conv's kernel size / stride / padding / dilation, zero-initialized,
  predicts `2 * deform_groups * kh * kw` offset channels; then `ops.deform_conv.deform_conv2d`
  with the layer's own kernel (no bias: mmcv's `DeformConv2d` refuses one).
- `ModulatedDeformConv2dPack` (mmcv, DCN v2): `conv_offset` predicts `3 * dg * kh * kw`
  channels; mmcv splits them with `torch.chunk(out, 3, dim=1)` into `o1, o2, mask` and
  concatenates `o1, o2` back, i.e. the first `2 * dg * kh * kw` channels are the offsets (in
  `deform_conv2d`'s `(dy, dx)` layout) and the last `dg * kh * kw` are mask logits, passed
  through a sigmoid. Has a bias by default (mmcv's default `bias=True`).

Parameters: `kernel` `[kh, kw, Cin / groups, Cout]` (HWIO), `bias` `[Cout]` (v2 only, by
default), `conv_offset/kernel`, `conv_offset/bias`; so mmdetection's `<name>.weight`,
`<name>.conv_offset.weight` / `.bias` convert by the generic name rules of `fgd_jax.convert`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from fgd_jax.ops.deform_conv import deform_conv2d

Array = jax.Array

# mmcv's DCN weight init: uniform(-1/sqrt(n), 1/sqrt(n)) with n = fan in (Flax counts the fan in
# of a grouped kernel per group, mmcv counts all input channels; only the init scale differs)
dcn_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class _DeformPack(nn.Module):
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None  # None: dilation * (kernel_size - 1) // 2
    dilation: int = 1
    groups: int = 1
    deform_groups: int = 1
    use_bias: bool = False
    dtype: Any = None
    kernel_init: Callable = dcn_uniform

    modulated = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        pad = self.dilation * (k - 1) // 2 if self.padding is None else self.padding
        c = x.shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(
                f"{type(self).__name__}: channels {c} -> {self.features} not divisible by "
                f"groups {self.groups}"
            )
        n_off = self.deform_groups * k * k
        out = nn.Conv(
            (3 if self.modulated else 2) * n_off,
            (k, k),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(self.dilation, self.dilation),
            use_bias=True,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="conv_offset",
        )(x)
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, c // self.groups, self.features), jnp.float32
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        offset = out[..., : 2 * n_off]
        mask = jax.nn.sigmoid(out[..., 2 * n_off :]) if self.modulated else None
        return deform_conv2d(
            x,
            offset,
            kernel,
            mask,
            bias,
            stride=self.stride,
            padding=pad,
            dilation=self.dilation,
            groups=self.groups,
            deform_groups=self.deform_groups,
        )


class DeformConv2dPack(_DeformPack):
    """mmcv `DeformConv2dPack` (DCN v1). `[B, H, W, Cin] -> [B, H', W', features]`, H' as
    `torch.nn.Conv2d` (square kernel, symmetric padding; default padding keeps the size at
    stride 1)."""


class ModulatedDeformConv2dPack(_DeformPack):
    """mmcv `ModulatedDeformConv2dPack` (DCN v2): offsets and sigmoid mask from `conv_offset`.
    `[B, H, W, Cin] -> [B, H', W', features]`."""

    use_bias: bool = True
    modulated = True

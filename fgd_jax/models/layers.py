"""Small shared Flax layers with mmdetection/PyTorch numerics (explicit padding, eps 1e-5).

`ConvModule` mirrors mmcv's `ConvModule` parameter names: the conv is `conv`, a BatchNorm is
`bn`, a GroupNorm is `gn`, so a converted `x.conv.weight` lands in `x/conv/kernel`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from fgd_jax.ops.dtypes import float_dtype

Array = jax.Array

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), mmdetection's ResNet conv init.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# mmcv xavier_init(distribution='uniform'), mmdetection's FPN conv init.
xavier_uniform = nn.initializers.xavier_uniform()


class PointwiseConv(nn.Module):
    """A 1x1 conv (no padding, no groups) as a matmul over channels: `x[:, ::s, ::s] @ W`.

    Same parameters as `nn.Conv` (`kernel` [1, 1, Cin, Cout] HWIO, `bias` [Cout]) and same
    result as PyTorch's 1x1 `Conv2d(stride=s)`; XLA:CPU runs its forward and both gradients
    as plain GEMMs, 1.5x faster on a ResNet-50 training step than the conv path
    (benchmarks/results/backbone_cpu.md).
    """

    features: int
    stride: int = 1
    use_bias: bool = False
    dtype: jnp.dtype | None = None
    kernel_init: Callable = kaiming_fan_out

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride]
        y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
        return y if bias is None else y + bias


def torch_conv(
    features: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    dtype: jnp.dtype | None = None,
    kernel_init: Callable = kaiming_fan_out,
    name: str | None = None,
) -> nn.Conv:
    """`nn.Conv` with PyTorch `Conv2d` semantics: symmetric explicit padding (default
    `dilation * (k - 1) // 2`), NHWC input, HWIO kernel, params fp32, compute in `dtype`.
    Unpadded ungrouped 1x1 convs are a `PointwiseConv` (same params and result, faster)."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    if kernel_size == 1 and padding == 0 and groups == 1:
        return PointwiseConv(
            features, stride, use_bias, dtype=dtype, kernel_init=kernel_init, name=name
        )
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


class TorchBatchNorm(nn.Module):
    """BatchNorm2d with PyTorch numerics on NHWC: eps 1e-5; in training mode normalizes with
    the biased batch variance and updates the running statistics with momentum 0.1 and the
    UNBIASED variance (as `torch.nn.BatchNorm2d`; `flax.linen.BatchNorm` uses the biased one).

    Params `scale`, `bias` [C] (fp32); `batch_stats` `mean`, `var` [C] (fp32).
    Statistics are computed in fp32 whatever `dtype` is; the output has `dtype`.
    """

    use_running_average: bool = True
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(float_dtype(x))
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                n = xf.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        dtype = self.dtype or x.dtype
        return x.astype(dtype) * mul.astype(dtype) + add.astype(dtype)


def torch_batch_norm(
    use_running_average: bool, dtype: jnp.dtype | None = None, name: str | None = None
) -> TorchBatchNorm:
    """A `TorchBatchNorm` (PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1)."""
    return TorchBatchNorm(use_running_average=use_running_average, dtype=dtype, name=name)


class ConvModule(nn.Module):
    """mmcv `ConvModule`: conv -> optional norm ('bn' | 'gn') -> optional ReLU.

    Input/output NHWC. With a norm the conv has no bias (mmcv's `bias='auto'`).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    norm: str | None = None  # None | 'bn' | 'gn'
    num_groups: int = 32  # for 'gn'
    act: bool = False
    use_bias: bool | None = None  # None: bias iff no norm
    dtype: jnp.dtype | None = None
    kernel_init: Callable = xavier_uniform

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, with_pre_norm: bool = False
    ) -> Array | tuple[Array, Array]:
        """`with_pre_norm=True` also returns the conv's output before the norm (what a hook on
        mmcv's `<module>.conv` sees): `(out, conv_out)`."""
        use_bias = self.norm is None if self.use_bias is None else self.use_bias
        x = torch_conv(
            self.features,
            self.kernel_size,
            self.stride,
            self.padding,
            use_bias=use_bias,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name="conv",
        )(x)
        pre_norm = x
        if self.norm == "bn":
            x = torch_batch_norm(not train, self.dtype, name="bn")(x)
        elif self.norm == "gn":
            x = nn.GroupNorm(
                num_groups=self.num_groups,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="gn",
            )(x)
        elif self.norm is not None:
            raise ValueError(f"ConvModule: unknown norm {self.norm!r} (None, 'bn' or 'gn')")
        if self.act:
            x = nn.relu(x)
        return (x, pre_norm) if with_pre_norm else x


def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch `F.interpolate(size=out, mode='nearest')` along one axis:
    `min(floor(dst * float32(in / out)), in - 1)`, computed in float32 like ATen."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest_to(x: Array, size: tuple[int, int]) -> Array:
    """Nearest resize of `x: [B, H, W, C]` to `size=(h, w)` with PyTorch index semantics."""
    _, h_in, w_in, _ = x.shape
    hi = torch_nearest_indices(h_in, size[0])
    wi = torch_nearest_indices(w_in, size[1])
    return jnp.take(jnp.take(x, hi, axis=1), wi, axis=2)


def max_pool_torch(x: Array, kernel: int, stride: int, padding: int = 0) -> Array:
    """PyTorch `F.max_pool2d` (floor mode, padding with -inf) on NHWC."""
    return nn.max_pool(
        x,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )


def head_tower(
    prefix: str,
    num_convs: int,
    features: int,
    *,
    dtype: jnp.dtype | None,
    kernel_init: Callable,
    norm: str | None = None,
    num_groups: int = 32,
    use_bias: bool = True,
) -> list[ConvModule]:
    """The stacked 3x3 conv(+norm)+ReLU towers of RetinaNet / FCOS heads, named `{prefix}_{i}`
    (mmdetection's `cls_convs.i` / `reg_convs.i`). Call inside a compact method: the modules
    belong to the caller."""
    return [
        ConvModule(
            features,
            3,
            norm=norm,
            num_groups=num_groups,
            act=True,
            use_bias=use_bias,
            dtype=dtype,
            kernel_init=kernel_init,
            name=f"{prefix}_{i}",
        )
        for i in range(num_convs)
    ]


def head_out_conv(
    features: int, bias: float, name: str, *, dtype: jnp.dtype | None, kernel_init: Callable
) -> nn.Conv:
    """A head's final 3x3 conv (padding 1, float32 parameters) with a constant bias init
    (the focal-loss prior for classification, 0 for regression)."""
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=nn.initializers.constant(bias),
        name=name,
    )
